r"""The release rules: whether an exported reader may replace the one in `release/reader`, and
the replacement.

  python -m digit_vit.model_card --model=DIR --check_size [--max_mb=16]
  python -m digit_vit.model_card --model=DIR --publish_to=release/reader [--force]

These are `model_card`'s command line: its `main` calls `command` here for them.

`--check_size` checks that DIR holds at most `--max_mb` megabytes (10^6 bytes) in all: the
limit a reader committed to the repository has (`release/`). `--publish_to=RELEASE` replaces the
reader in RELEASE with DIR (a complete copy renamed into place) only when DIR is within the size
limit, has its card, and is measured better (`compare`: at least as high an exact match on each
of test, wild and long as the release, and higher on one); otherwise it refuses, naming the
figures, unless `--force`. A RELEASE that already holds this very reader is left as it is.

Errors: one line on stderr. Exit status 2 for a --model that is not a directory or not an
export, 1 when the size check fails or the release refuses the reader.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Mapping

from digit_vit import serving

# The card a released reader must hold (`model_card` writes it).
CARD_FILE = "MODEL_CARD.md"
# What a reader committed to the repository may weigh in all (issue 44), in MB of 10^6 bytes.
MAX_RELEASE_MB = 16.0
# The splits a release is compared on (and the card's figures are of).
SPLITS = ("test", "wild", "long")
# The figure a release is compared by, on each of SPLITS.
COMPARED_METRIC = "exact_match"
MISSING = "missing"


class ReleaseError(Exception):
  """A reader that may not be released (too large, no card, or not measured better)."""


# ----------------------------------------------------------------------------------------------
# Formatting


def pct(value, digits: int = 2) -> str:
  """A fraction as a percentage for the card ('93.25%'), or 'missing' for None or NaN."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return MISSING
  return f"{100 * float(value):.{digits}f}%"


def read_json(path: pathlib.Path) -> dict | None:
  """The JSON object in `path`, or None when it is absent, unreadable or not an object."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------------------------
# The rules


def directory_bytes(directory: str | os.PathLike) -> int:
  """The bytes of every file under `directory`."""
  return sum(p.stat().st_size for p in pathlib.Path(directory).rglob("*") if p.is_file())


def size_problem(directory: str | os.PathLike, max_mb: float = MAX_RELEASE_MB) -> str | None:
  """Why `directory` is too large for a release (more than `max_mb` * 10^6 bytes), or None."""
  size = directory_bytes(directory)
  if size <= max_mb * 1e6:
    return None
  largest = sorted((p for p in pathlib.Path(directory).rglob("*") if p.is_file()),
                   key=lambda p: -p.stat().st_size)[:3]
  return (f"{directory} holds {size / 1e6:.2f} MB, over the release limit of {max_mb:g} MB "
          f"(largest: {', '.join(f'{p.name} {p.stat().st_size / 1e6:.2f} MB' for p in largest)}"
          "): export fewer width buckets or platforms (--platforms=cpu), or a smaller model")


@dataclasses.dataclass
class Comparison:
  """`compare`'s verdict: whether the candidate is better, and the figures side by side."""
  better: bool
  figures: dict[str, tuple[float | None, float | None]]  # split -> (candidate, release)
  reason: str


def _headline(manifest: Mapping | None) -> dict[str, float | None]:
  metrics = ((manifest or {}).get("run") or {}).get("metrics") or {}
  out = {}
  for split in SPLITS:
    value = metrics.get(f"{split}_{COMPARED_METRIC}")
    out[split] = (float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                  else None)
  return out


def compare(candidate: Mapping, release: Mapping | None) -> Comparison:
  """Whether the reader of manifest `candidate` is measured better than the release's.

  Better: the exact match measured on each of test, wild and long, at least as high as the
  release's on each and higher on one. A figure the release lacks counts as lower than any;
  a candidate that lacks one is not better (it was not measured). No release: better.
  """
  mine, theirs = _headline(candidate), _headline(release)
  figures = {s: (mine[s], theirs[s]) for s in SPLITS}
  unmeasured = [s for s in SPLITS if mine[s] is None]
  if unmeasured:
    return Comparison(False, figures, f"the candidate has no measured {COMPARED_METRIC} on "
                      f"{', '.join(unmeasured)}: evaluate it with --splits=test,wild,long and "
                      "export again")
  if release is None:
    return Comparison(True, figures, "there is no release yet")
  worse = [s for s in SPLITS if theirs[s] is not None and mine[s] < theirs[s]]
  gained = [s for s in SPLITS if theirs[s] is None or mine[s] > theirs[s]]
  side = "; ".join(f"{s} {pct(mine[s])} against {pct(theirs[s])}" for s in SPLITS)
  if worse:
    return Comparison(False, figures, f"it reads worse on {', '.join(worse)} ({side})")
  if not gained:
    return Comparison(False, figures, f"it reads no better on any split ({side})")
  return Comparison(True, figures, f"it reads better on {', '.join(gained)} ({side})")


def _same_reader(a: Mapping, b: Mapping) -> bool:
  """Both manifests are the same: the same export (its files by checksum, its step, metrics
  and creation time), whatever the card beside it says."""
  return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _same_files(a: pathlib.Path, b: pathlib.Path) -> bool:
  names = sorted(p.name for p in a.iterdir() if p.is_file())
  return names == sorted(p.name for p in b.iterdir() if p.is_file()) and all(
      (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def publish(candidate: str | os.PathLike, release: str | os.PathLike, *, force: bool = False,
            max_mb: float = MAX_RELEASE_MB) -> str:
  """Replaces the reader in `release` with the one in `candidate` when it may be released
  (see the module docstring); returns what was done.

  Raises:
    serving.ArtifactError: `candidate` is not an exported reader.
    ReleaseError: too large, no card, or not better than the release (and not `force`).
  """
  candidate, release = pathlib.Path(candidate), pathlib.Path(release)
  manifest = serving.read_manifest(candidate)
  problem = size_problem(candidate, max_mb)
  if problem:
    raise ReleaseError(problem)
  if not (candidate / CARD_FILE).is_file():
    raise ReleaseError(f"{candidate} has no {CARD_FILE}: write it first (python -m "
                       f"digit_vit.model_card --workdir=RUN --model={candidate})")
  current = None
  if (release / serving.MANIFEST).is_file():
    current = read_json(release / serving.MANIFEST)
    if current is None and not force:
      raise ReleaseError(f"{release / serving.MANIFEST} cannot be read, so the release cannot be "
                         "compared; --force (RELEASE_FORCE=1) replaces it")
  elif release.exists() and (not release.is_dir() or any(release.iterdir())):
    raise ReleaseError(f"{release} holds files and no exported reader: move them away first")
  if current is not None and _same_reader(manifest, current):
    if _same_files(candidate, release):
      return f"{release} already holds this reader"
    # The same reader with another card (or pictures): replaced, as nothing is lost.
    verdict = Comparison(True, {}, "the same reader, its card rewritten")
  else:
    verdict = compare(manifest, current)
  if not verdict.better and not force:
    raise ReleaseError(f"{release} is kept: the reader in {candidate} is not measured better: "
                       f"{verdict.reason}. --force (RELEASE_FORCE=1) replaces it anyway")
  release.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{release.name}.", dir=release.parent))
  try:
    for path in candidate.iterdir():
      if path.is_file():
        shutil.copy2(path, staging / path.name)
    from digit_vit import export  # pylint: disable=import-outside-toplevel
    export._replace(staging, release)  # pylint: disable=protected-access
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return (f"released {candidate} to {release}: {verdict.reason}"
          + (" (forced)" if force and not verdict.better else ""))


# ----------------------------------------------------------------------------------------------
# Command line (model_card's)


def command(model: str, *, check_size: bool, publish_to: str | None, force: bool,
            max_mb: float) -> int:
  """`--check_size` (first) or `--publish_to` of `python -m digit_vit.model_card --model=DIR`:
  prints what was done and returns the exit status (see the module docstring)."""
  from digit_vit import cli  # pylint: disable=import-outside-toplevel
  if check_size:
    if not pathlib.Path(model).is_dir():
      return cli.error(f"--model={model}: no such directory", cli.USAGE)
    problem = size_problem(model, max_mb)
    if problem:
      return cli.error(problem, cli.FAILURE)
    print(f"{model}: {directory_bytes(model) / 1e6:.2f} MB, within the {max_mb:g} MB "
          "release limit")
    return 0
  try:
    print(publish(model, publish_to, force=force, max_mb=max_mb))
  except serving.ArtifactError as e:
    return cli.error(str(e), cli.USAGE)
  except ReleaseError as e:
    return cli.error(str(e), cli.FAILURE)
  return 0
