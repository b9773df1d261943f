"""Sweeps: a base config and a grid of overrides, each point trained in its own process.

A sweep file (`experiments/sweeps/*.py`) defines `SWEEP = Sweep(...)`: the base config, the
grid (label -> dotted overrides such as `{"model.patch_size": (8, 8)}`), the table columns, the
plots and a conclusion hook. `run_sweep` resolves every point to its full config (the base,
then the sweep's `fixed` overrides, in quick mode the `quick` ones, then the point's own, then
any given on the command line), keys it by a hash of that config (sorted JSON), and runs

  python -m digit_vit.main --config=configs/<base>.py --workdir=runs/sweeps/<hash> \
      --config.<key>=<value> ...

for one point after the other; `--dry_run` prints the same commands for a cluster scheduler.
A finished point leaves `points/<hash>.json` in the sweep's results folder (its report, a
compact history and the command); re-running skips it, and a point whose workdir already holds
a report (run by a scheduler, or stopped after training) is collected without training again.
An interrupted point resumes from its last checkpoint. A point that fails (a non-zero exit,
e.g. a non-finite loss) is recorded as failed and skipped until `retry_failed`. Workdirs are
named by the hash alone, so a config that several sweeps contain trains once. A sweep's
`costly` points (hours on a laptop CPU) run in full mode only when asked.

Then `results.csv`, `results.md` (the table, the plots and the sweep's conclusion written from
the measured values) and the PNG plots are rewritten from the points of the current grid.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only.
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from digit_vit import config_lib, tasks  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SWEEP_DIR = ROOT / "experiments" / "sweeps"
RESULTS_DIR = ROOT / "experiments" / "results"       # Full-mode results (committed).
QUICK_RESULTS_DIR = ROOT / "runs" / "experiments-quick"  # Quick-mode results (git-ignored).
WORKDIR_ROOT = ROOT / "runs" / "sweeps"              # Checkpoints and logs of every point.

# Applied to every point of every sweep: a child writing to a log file needs no progress bar.
RUNNER_OVERRIDES = {"progress_bar": False}

# Quick mode on the seconds-fast tiny config (16x48 canvas, 1-3 digits, a 1+1-block model):
# a point takes well under a minute here, most of it process start-up and compilation.
QUICK_OVERRIDES = {
    "num_train_steps": 120,
    "warmup_steps": 10,
    "log_every_steps": 10,
    "eval_every_steps": 40,
    "checkpoint_every_steps": 120,  # One checkpoint, at the end.
    "num_eval_examples": 64,
    "learning_rate": 3e-3,
}

READ_COLUMNS = ("test_exact_match", "test_cer", "test_token_accuracy", "test_no_eos",
                "test_wrong_length", "test_order_errors", "train_images_per_second",
                "num_params")
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
POINTS = "points"
WALL_FILE = "sweep_wall.json"  # In a point's workdir: the wall time of its process.


@dataclasses.dataclass(frozen=True)
class Sweep:
  """What a sweep file declares.

  Attributes:
    name: folder name of the results (`experiments/results/<name>`).
    title: one line for the Markdown heading.
    question: the seeds' claim or the question the sweep answers (Markdown).
    base: the config of the full mode, a name in configs/ or a path, optionally ':arg'.
    grid: label -> the point's dotted overrides, e.g. {"8x8": {"model.patch_size": (8, 8)}}.
    fixed: overrides of every point in both modes (e.g. the patch embedding of a patch sweep).
    quick_base: the config of the quick mode.
    quick: overrides of every point in quick mode (after `fixed`).
    quick_grid: the grid of quick mode where the full grid does not fit the quick canvas.
    columns: report keys shown in the Markdown table (the CSV has every key).
    quick_columns: the columns in quick mode, where they differ (e.g. other lengths).
    bars: report keys drawn as grouped bars per point (fractions in [0, 1]).
    scatter: (x key, y key) pairs, one scatter plot each (e.g. images/s against exact match).
    per_length: draw exact match and digits read by target length (reader sweeps).
    costly: labels of full-mode points that run only when asked (`costly=True`, --costly):
      ones that take hours on a laptop CPU. Their rows say so until they have run.
    conclusion: rows -> Markdown: the finding, written from the measured rows (see `rows`).
  """
  name: str
  title: str
  question: str
  base: str
  grid: Mapping[str, Mapping[str, Any]]
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  quick_base: str = "tiny"
  quick: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(QUICK_OVERRIDES))
  quick_grid: Mapping[str, Mapping[str, Any]] | None = None
  columns: Sequence[str] = READ_COLUMNS
  quick_columns: Sequence[str] | None = None
  bars: Sequence[str] = ("test_exact_match", "test_token_accuracy", "test_cer")
  scatter: Sequence[tuple[str, str]] = ()
  per_length: bool = True
  costly: Sequence[str] = ()
  conclusion: Callable[[list[dict]], str] | None = None


@dataclasses.dataclass(frozen=True)
class Point:
  """One resolved point of a sweep.

  Attributes:
    index: its place in the grid.
    label: its name in tables and plots.
    varied: the point's own overrides (what the sweep varies).
    overrides: every override on its command line, in order.
    config: the config file (relative to the repo root when inside it), with ':arg' if any.
    config_hash: 12 hex digits of the SHA-256 of the resolved config's sorted JSON.
    workdir: where the point trains.
  """
  index: int
  label: str
  varied: dict
  overrides: dict
  config: str
  config_hash: str
  workdir: pathlib.Path

  def argv(self, python: str = sys.executable) -> list[str]:
    """The command that trains the point (run it from the repo root)."""
    return ([python, "-m", "digit_vit.main", f"--config={self.config}",
             f"--workdir={_display_path(self.workdir)}"]
            + override_flags(self.overrides))

  def command(self) -> str:
    """The command as a shell line, with `python` for the interpreter."""
    return shlex.join(self.argv(python="python"))


# ----------------------------------------------------------------------------------------------
# Configs, overrides and hashes


def load_sweep(path_or_name: str | os.PathLike) -> Sweep:
  """The `SWEEP` of a sweep file, given its path or its name in experiments/sweeps/."""
  module = config_lib.import_file(path_or_name, SWEEP_DIR, "sweep")
  if not isinstance(getattr(module, "SWEEP", None), Sweep):
    raise ValueError(f"{module.__file__} defines no `SWEEP = Sweep(...)`")
  return module.SWEEP


def config_file(spec: str) -> str:
  """'default' or 'configs/default.py' (optionally ':arg') -> the --config= value."""
  name, sep, arg = spec.partition(":")
  path = pathlib.Path(name)
  if path.suffix != ".py":
    path = ROOT / "configs" / f"{name}.py"
  if not path.is_absolute() and not path.exists():
    path = ROOT / path
  if not path.exists():
    raise FileNotFoundError(f"no config file {path} for {spec!r}")
  return _display_path(path) + (sep + arg)


def _display_path(path: pathlib.Path) -> str:
  """A path relative to the repo root when inside it (commands run from the root)."""
  path = pathlib.Path(path).resolve()
  try:
    return str(path.relative_to(ROOT))
  except ValueError:
    return str(path)


def flag_value(value: Any) -> str:
  """A Python value as `--config.key=` text that ml_collections parses back to it."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
  return [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]


def resolve_config(config: str, overrides: Mapping[str, Any]):
  """The config a child process would run: parsed by ml_collections' own flag code from the
  same arguments, so the hash here is the hash of what trains there."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  name, sep, arg = config.partition(":")
  path = pathlib.Path(name)
  argv = ["sweep", f"--config={path if path.is_absolute() else ROOT / path}{sep}{arg}",
          *override_flags(overrides)]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv,
                                  lock_config=True)
  flag_values(argv)
  return flag_values.config


# Config fields added after results were recorded under experiments/results/, each with the
# value that behaves as the code did before it existed. At that value a field is left out of
# the hash, so a new option does not orphan every finished point; any other value is hashed.
# Options removed since (`config_lib.REMOVED_FIELDS`) are left out at their neutral values too,
# so the workdirs of points that ran while they existed keep their hashes.
ADDED_FIELDS = {"model.stem_depth": 0, "model.stem_max_channels": 0, "ema_decay": 0.0,
                "decode.views": 1, "data.augment.clean_final_steps": 0, "model.ctc_head": False,
                "loss.ctc_weight": 0.0,
                # 8a83775: best-k checkpoints; 1 keeps the best by validation, as before.
                "keep_best_checkpoints": 1,
                # 2026-12-07: bfloat16 matmul operands; float32 computes as before.
                "model.matmul_dtype": "float32",
                # 2026-12-07: reading with the CTC head's columns; the decoder reads as before.
                "decode.reader": "decoder",
                # 2026-12-07: the joint reading's CTC weight; no other reader uses it.
                "decode.ctc_weight": 0.5}

# Results measured by earlier code, kept as the record of those experiments (docs/results.md
# cites them): `{"code": ..., "description": ..., "points": {sweep: [hash, ...]}}`. Their
# hashes are of the configs that code resolved (each record's `resolved_config`); a change of
# the code and its defaults that no ADDED_FIELDS entry can undo (the width buckets: a new
# dataset, new model defaults) keys every point anew, so these records match no current point
# and a sweep run now trains its points again. The list is frozen: a record of the current
# code is keyed by a current point (tests/test_experiments.py checks both).
EARLIER_CODE_FILE = RESULTS_DIR / "measured_by_earlier_code.json"


def earlier_code_points(path: str | os.PathLike = EARLIER_CODE_FILE) -> dict[str, set[str]]:
  """sweep name -> the hashes of its committed points measured by earlier code."""
  path = pathlib.Path(path)
  if not path.exists():
    return {}
  return {name: set(hashes) for name, hashes in _read_json(path)["points"].items()}


def config_hash(config_json: Mapping | str) -> str:
  """12 hex digits of SHA-256 over the sorted JSON of a config (a ConfigDict's JSON text, or
  the dict read back from a workdir's config.json), without the ADDED_FIELDS and the
  REMOVED_FIELDS at their neutral values."""
  if isinstance(config_json, str):
    config_json = json.loads(config_json)
  config_json = config_lib.drop_neutral(config_json,
                                        {**ADDED_FIELDS, **config_lib.REMOVED_FIELDS})
  text = json.dumps(config_json, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def points(sweep: Sweep, *, quick: bool = False, workdir_root: str | os.PathLike | None = None,
           extra: Mapping[str, Any] | None = None) -> list[Point]:
  """Every point of the sweep, resolved (configs parsed and hashed, nothing run)."""
  grid = sweep.quick_grid if quick and sweep.quick_grid is not None else sweep.grid
  config = config_file(sweep.quick_base if quick else sweep.base)
  # Workdirs are named by the hash alone and shared by all sweeps: a config that two sweeps
  # contain (the default architecture is a point of most) trains once and is collected twice.
  root = pathlib.Path(workdir_root or (WORKDIR_ROOT.parent / "sweeps-quick" if quick
                                       else WORKDIR_ROOT))
  out = []
  for index, (label, varied) in enumerate(grid.items()):
    overrides = {**sweep.fixed, **(sweep.quick if quick else {}), **varied,
                 **RUNNER_OVERRIDES, **(extra or {})}
    resolved = resolve_config(config, overrides)
    digest = config_hash(resolved.to_json_best_effort())
    out.append(Point(index=index, label=label, varied=dict(varied), overrides=overrides,
                     config=config, config_hash=digest, workdir=(root / digest).resolve()))
  hashes = [p.config_hash for p in out]
  if len(set(hashes)) != len(hashes):
    raise ValueError(f"sweep {sweep.name!r} has points with the same resolved config: "
                     f"{[p.label for p in out if hashes.count(p.config_hash) > 1]}")
  return out


# ----------------------------------------------------------------------------------------------
# Running and collecting points


def _read_json(path: pathlib.Path):
  with open(path) as f:
    return json.load(f)


def _write_json(path: pathlib.Path, value):
  """Writes through a temporary file, so a killed runner never leaves half a record."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _compact_history(workdir: pathlib.Path) -> list[dict]:
  """The run's validation records and its train loss/accuracy/rate, for the sweep's curves."""
  path = workdir / "history.jsonl"
  if not path.exists():
    return []
  keep = ("step", "split", "loss", "accuracy", "exact_match", "token_accuracy", "cer",
          "images_per_second")
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [{k: r[k] for k in keep if k in r} for r in records]


def collect(point: Point) -> dict:
  """The record of a point whose workdir holds a finished run (report.json)."""
  workdir = point.workdir
  config_json = _read_json(workdir / "config.json")
  child_hash = config_hash(config_json)
  if child_hash != point.config_hash:
    raise RuntimeError(
        f"{workdir}/config.json hashes to {child_hash}, not {point.config_hash}: the child "
        "parsed its overrides differently from the runner (check flag_value for this type)")
  record = {"status": "ok", "report": _read_json(workdir / "report.json"),
            "history": _compact_history(workdir), "resolved_config": config_json}
  if (workdir / WALL_FILE).exists():
    record["wall_seconds"] = _read_json(workdir / WALL_FILE)["wall_seconds"]
  return record


def run_point(point: Point, *, log=print) -> dict:
  """Trains one point in its own process (output in <workdir>/run.log); returns its record."""
  point.workdir.mkdir(parents=True, exist_ok=True)
  log_path = point.workdir / "run.log"
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
  start = time.perf_counter()
  with open(log_path, "a") as log_file:
    log_file.write(f"\n$ {point.command()}\n")
    log_file.flush()
    code = subprocess.call(point.argv(), cwd=ROOT, env=env, stdout=log_file,
                           stderr=subprocess.STDOUT)
  wall = time.perf_counter() - start
  # Kept beside the run, so another sweep that collects this workdir knows its wall time.
  _write_json(point.workdir / WALL_FILE, {"wall_seconds": wall, "returncode": code})
  if code == 0 and (point.workdir / "report.json").exists():
    record = collect(point)
  else:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    lines = tail.splitlines() or [""]
    errors = [line for line in lines if "Error" in line or "error" in line]
    # The exception's last line names what went wrong (e.g. the non-finite loss and its step).
    error = (errors or lines)[-1].strip()[-500:]
    record = {"status": "failed", "returncode": code, "error": error, "log_tail": tail}
    log(f"    failed (exit {code}): {record['error']}")
  record["wall_seconds"] = wall
  return record


def _record_base(sweep: Sweep, point: Point, quick: bool) -> dict:
  return {"sweep": sweep.name, "mode": "quick" if quick else "full", "label": point.label,
          "index": point.index, "varied": point.varied, "overrides": point.overrides,
          "config": point.config, "config_hash": point.config_hash,
          "command": point.command(), "workdir": _display_path(point.workdir),
          "finished": datetime.datetime.now().isoformat(timespec="seconds"),
          "machine": machine()}


def machine() -> dict:
  """Where the points ran (the runner's machine: points run on it, one at a time)."""
  return {"platform": platform.platform(), "processor": platform.machine(),
          "cpus": os.cpu_count(), "python": platform.python_version()}


def run_sweep(sweep: Sweep, *, quick: bool = False, results_dir=None, workdir_root=None,
              extra: Mapping[str, Any] | None = None, dry_run: bool = False,
              collect_only: bool = False, only: Sequence[str] | None = None,
              retry_failed: bool = False, costly: bool = False, command: str | None = None,
              log=print) -> list[dict]:
  """Runs the sweep's missing points one after the other, then writes its table and plots.

  Args:
    sweep: the sweep.
    quick: run the quick mode (quick_base, quick overrides, quick_grid).
    results_dir: the root of the results; the sweep writes into <results_dir>/<name>.
      Default experiments/results (full) or runs/experiments-quick (quick).
    workdir_root: the root of the points' workdirs (default runs/sweeps[-quick]).
    extra: overrides added to every point (they change its hash).
    dry_run: print the commands of the points still to run; run and write nothing.
    collect_only: run nothing; collect finished workdirs and write the table.
    only: labels or grid indices to run (the table still shows every finished point).
    retry_failed: run again the points recorded as failed.
    costly: run the sweep's costly points too (full mode; quick mode always runs them).
    command: the command line to quote in results.md.
    log: where progress lines go.

  Returns:
    the table rows (see `rows`), one per point of the grid, in grid order.
  """
  pts = points(sweep, quick=quick, workdir_root=workdir_root, extra=extra)
  out_dir = pathlib.Path(results_dir or (QUICK_RESULTS_DIR if quick else RESULTS_DIR))
  out_dir = out_dir / sweep.name
  selected = {p.label for p in pts if not only or p.label in only or str(p.index) in only}
  if only and len(selected) != len(set(only)):
    known = [f"{p.index}: {p.label}" for p in pts]
    raise ValueError(f"--only {list(only)} names points not in the grid {known}")
  records: dict[str, dict] = {}

  def skip_costly(point):
    named = bool(only) and (point.label in only or str(point.index) in only)
    return not (quick or costly or named) and point.label in sweep.costly

  for point in pts:
    path = out_dir / POINTS / f"{point.config_hash}.json"
    tag = f"[{point.index + 1}/{len(pts)}] {point.label} ({point.config_hash})"
    record = _read_json(path) if path.exists() else None
    if record is not None and (record["status"] == "ok" or not retry_failed):
      log(f"{tag}: done before ({record['status']}), skipped")
      records[point.label] = record
      continue
    if (point.workdir / "report.json").exists():
      record = {**_record_base(sweep, point, quick), **collect(point)}
      log(f"{tag}: collected from {_display_path(point.workdir)}")
    elif skip_costly(point):
      log(f"{tag}: costly, not run (--costly runs it)")
      continue
    elif dry_run:
      log(point.command())
      continue
    elif collect_only or point.label not in selected:
      log(f"{tag}: not run")
      continue
    else:
      log(f"{tag}: running in {_display_path(point.workdir)}")
      record = {**_record_base(sweep, point, quick), **run_point(point, log=log)}
      if record["status"] == "ok":
        log(f"    {summary_line(record['report'])} in {record['wall_seconds']:.0f} s")
    if not dry_run:
      _write_json(path, record)
    records[point.label] = record
  table = rows(pts, records)
  for r, point in zip(table, pts):
    if r["status"] == "missing" and skip_costly(point):
      r["error"] = "costly, run with --costly"
  if not dry_run:
    write_results(sweep, table, out_dir, quick=quick, command=command)
    log(f"results: {_display_path(out_dir / RESULTS_MD)}")
  return table


def summary_line(report: Mapping) -> str:
  if "test_exact_match" in report:
    return (f"test exact match {report['test_exact_match']:.1%}, "
            f"CER {report['test_cer']:.2%}, no <eos> {report['test_no_eos']}")
  if "test_accuracy" in report:
    return f"test accuracy {report['test_accuracy']:.2%}"
  return "done"


def rows(pts: Sequence[Point], records: Mapping[str, dict]) -> list[dict]:
  """One flat dict per point of the grid: label, status ('ok', 'failed', 'missing'),
  config_hash, varied (the point's overrides), config (the resolved config as a dict, when
  finished), wall_seconds, error, command, history, and every report key."""
  out = []
  for p in pts:
    record = records.get(p.label, {})
    out.append({"label": p.label, "status": record.get("status", "missing"),
                "config_hash": p.config_hash, "varied": p.varied,
                "wall_seconds": record.get("wall_seconds"), "error": record.get("error"),
                "command": p.command(), "history": record.get("history", []),
                "config": record.get("resolved_config", {}),
                **record.get("report", {})})
  return out


def ok_rows(table: Sequence[dict]) -> list[dict]:
  """The rows of points that finished."""
  return [r for r in table if r["status"] == "ok"]


# ----------------------------------------------------------------------------------------------
# Tables


def _is_fraction(key: str) -> bool:
  return any(key.endswith(s) or f"{s}_length_" in key
             for s in ("exact_match", "accuracy", "cer"))


def fmt(key: str, value) -> str:
  """A table cell: fractions as percentages, rates and counts as integers."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, str):
    return value
  if _is_fraction(key):
    return f"{100 * value:.1f}%"
  if "per_second" in key or key in ("num_params", "steps") or isinstance(value, int):
    return f"{value:,.0f}"
  if "seconds" in key:
    return f"{value / 60:.1f} min"
  return f"{value:.4g}"


def header(key: str) -> str:
  return key.replace("_", " ").replace("images per second", "images/s")


def write_results(sweep: Sweep, table: Sequence[dict], out_dir: pathlib.Path, *, quick: bool,
                  command: str | None = None) -> dict[str, pathlib.Path]:
  """Writes results.csv, the plots and results.md into out_dir; returns their paths."""
  out_dir.mkdir(parents=True, exist_ok=True)
  files = {"csv": out_dir / RESULTS_CSV, "md": out_dir / RESULTS_MD}
  write_csv(files["csv"], table)
  files.update(plot_all(sweep, table, out_dir))
  conclusion = ""
  if sweep.conclusion is not None and ok_rows(table):
    conclusion = sweep.conclusion(list(table)).strip()
  files["md"].write_text(markdown(sweep, table, {k: v.name for k, v in files.items()
                                                  if k not in ("csv", "md")},
                                  quick=quick, command=command, conclusion=conclusion))
  return files


def write_csv(path: pathlib.Path, table: Sequence[dict]):
  """Every scalar of every row: label, status, hash, overrides (JSON), then the report."""
  first = ["label", "status", "config_hash", "varied", "wall_seconds", "error"]
  rest = sorted({k for r in table for k, v in r.items()
                 if k not in first and not isinstance(v, (list, dict))})
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(first + rest)
    for r in table:
      writer.writerow([json.dumps(r["varied"], sort_keys=True) if k == "varied" else r.get(k)
                       for k in first] + [r.get(k) for k in rest])


def markdown(sweep: Sweep, table: Sequence[dict], plots: Mapping[str, str], *, quick: bool,
             command: str | None, conclusion: str) -> str:
  """results.md: the question, how it was made, the table, the plots, the conclusion."""
  mode = "quick" if quick else "full"
  pts_ok = ok_rows(table)
  lines = [f"# {sweep.title}", "", sweep.question.strip(), ""]
  if quick:
    lines += ["> **Quick mode**: shrunk runs (the overrides below) that check the machinery;",
              "> the numbers are not a finding.", ""]
  base = sweep.quick_base if quick else sweep.base
  cmd = command or (f"python -m experiments.run experiments/sweeps/{sweep.name}.py"
                    + (" --quick" if quick else ""))
  fixed = {**sweep.fixed, **(sweep.quick if quick else {})}
  lines += [f"Made by `{cmd}` ({mode} mode) from the repo root. Each point ran as its own "
            "process, with the command listed at the end; `points/<hash>.json` holds its "
            "report and history, `results.csv` every metric.", "",
            f"- base config: `{config_file(base)}`"
            + (f" with {_inline(fixed)} on every point" if fixed else ""),
            f"- machine: {_machine_line()}",
            f"- finished points: {len(pts_ok)} of {len(table)}", ""]
  wanted = sweep.quick_columns if quick and sweep.quick_columns is not None else sweep.columns
  columns = [c for c in wanted if any(c in r for r in table)]
  lines += ["| point | overrides | " + " | ".join(header(c) for c in columns)
            + " | wall time |",
            "| --- | --- | " + " | ".join("---:" for _ in columns) + " | ---: |"]
  for r in table:
    if r["status"] == "ok":
      cells = [fmt(c, r.get(c)) for c in columns] + [fmt("wall_seconds", r["wall_seconds"])]
    else:
      note = r["status"] + (f": {r['error']}" if r.get("error") else "")
      cells = [note.replace("|", "/")] + ["-"] * len(columns)
    lines.append(f"| {r['label']} | {_inline(r['varied'])} | " + " | ".join(cells) + " |")
  lines += ["", "Rates are images per second on the machine above: `train images/s` is the "
            "median logged training interval after the first (which compiles); `test images/s` "
            "is greedy decoding of the test split. Counts are out of the "
            f"{_count(pts_ok)} test lines.", ""]
  for name in plots.values():
    lines += [f"![{name}]({name})", ""]
  if conclusion:
    lines += ["## Conclusion", "", conclusion, ""]
  lines += ["## Commands of the points", "", "```"]
  lines += [r["command"] for r in table]
  lines += ["```", ""]
  return "\n".join(lines)


def _inline(overrides: Mapping) -> str:
  if not overrides:
    return "(base)"
  return ", ".join(f"`{k}={flag_value(v)}`" for k, v in overrides.items())


def _count(table) -> str:
  counts = {r.get("test_num_examples") for r in table}
  return "/".join(str(c) for c in sorted(c for c in counts if c is not None)) or "?"


def _machine_line() -> str:
  m = machine()
  return f"{m['platform']}, {m['cpus']} CPUs, Python {m['python']}"


# ----------------------------------------------------------------------------------------------
# Plots


def plot_all(sweep: Sweep, table: Sequence[dict], out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """The sweep's plots of the finished points; returns {name: path} of those drawn."""
  done = ok_rows(table)
  files = {}
  if not done:
    return files
  bars = [k for k in sweep.bars if any(k in r for r in done)]
  if bars:
    files["metrics"] = out_dir / "metrics.png"
    plot_bars(done, bars, files["metrics"])
  for x, y in sweep.scatter:
    if any(x in r and y in r for r in done):
      files[f"{y}_vs_{x}"] = out_dir / f"{y}_vs_{x}.png"
      plot_scatter(done, x, y, files[f"{y}_vs_{x}"])
  if sweep.per_length and any("test_exact_match_length_1" in r for r in done):
    files["by_length"] = out_dir / "by_length.png"
    plot_by_length(done, files["by_length"])
  if any(r["history"] for r in done):
    files["curves"] = out_dir / "curves.png"
    plot_histories(done, files["curves"])
  return files


def plot_bars(done: Sequence[dict], keys: Sequence[str], path: pathlib.Path):
  """Grouped bars: one group per metric, one bar per point."""
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) * len(done) ** 0.5 + 3), 4))
  width = 0.8 / len(done)
  for i, r in enumerate(done):
    values = [r.get(k, np.nan) for k in keys]
    bars = ax.bar(np.arange(len(keys)) + (i - (len(done) - 1) / 2) * width, values, width,
                  label=r["label"])
    ax.bar_label(bars, labels=[fmt(k, v) for k, v in zip(keys, values)], fontsize=6,
                 rotation=90, padding=2)
  ax.set_xticks(np.arange(len(keys)), [header(k) for k in keys])
  ax.set_ylim(0, 1.15)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, ncols=min(len(done), 4), loc="upper center")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_scatter(done: Sequence[dict], x: str, y: str, path: pathlib.Path):
  """y against x, each point labelled (e.g. exact match against training images/s)."""
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for r in done:
    if x in r and y in r:
      ax.scatter(r[x], r[y], s=40)
      ax.annotate(r["label"], (r[x], r[y]), textcoords="offset points", xytext=(5, 4),
                  fontsize=8)
  xs = [r[x] for r in done if x in r and r[x]]
  if xs and min(xs) > 0 and max(xs) / min(xs) > 8:
    ax.set_xscale("log")
  ax.set_xlabel(header(x))
  ax.set_ylabel(header(y))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _by_length(r: Mapping, prefix: str) -> tuple[list[int], list[float]]:
  found = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in r.items()
                 if k.startswith(prefix) and k.rsplit("_", 1)[1].isdigit())
  return [n for n, _ in found], [v for _, v in found]


def plot_by_length(done: Sequence[dict], path: pathlib.Path):
  """Test exact match, and the mean number of digits read, against the line's true length."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  longest = 1
  for r in done:
    n, v = _by_length(r, "test_exact_match_length_")
    axes[0].plot(n, v, marker="o", label=r["label"])
    n, v = _by_length(r, "test_read_length_")
    if n:
      axes[1].plot(n, v, marker="o", label=r["label"])
      longest = max(longest, max(n))
  axes[1].plot([1, longest], [1, longest], color="gray", linestyle=":", label="right length")
  axes[0].axhline(0, color="gray", linewidth=0.5)
  axes[0].set_ylabel("test exact match")
  axes[0].set_ylim(-0.02, 1.02)
  axes[1].set_ylabel("digits read (mean)")
  for ax in axes:
    ax.set_xlabel("digits in the line")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_histories(done: Sequence[dict], path: pathlib.Path):
  """Training loss and the validation main metric against the step, one line per point."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  metric = "exact_match" if any("test_exact_match" in r for r in done) else "accuracy"
  for r in done:
    train = [(h["step"], h["loss"]) for h in r["history"] if h["split"] == "train" and "loss" in h]
    val = [(h["step"], h[metric]) for h in r["history"]
           if h["split"] == "validation" and metric in h]
    if train:
      axes[0].plot(*zip(*train), label=r["label"])
    if val:
      axes[1].plot(*zip(*val), marker="o", label=r["label"])
  axes[0].set_yscale("log")
  axes[0].set_ylabel("training loss")
  axes[1].set_ylabel(f"validation {header(metric)}")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Estimates


def train_rate(config, *, repeats: int = 3) -> float:
  """Training images/s of `config` here: compiled train steps on a random batch, the median of
  `repeats` after one warm-up step."""
  import jax  # pylint: disable=import-outside-toplevel
  from digit_vit import state as state_lib, steps  # pylint: disable=import-outside-toplevel
  from digit_vit.models import build_model, tokens  # pylint: disable=import-outside-toplevel
  model = build_model(config)
  mesh = state_lib.create_mesh()
  learning_rate_fn = state_lib.create_learning_rate_fn(config)
  state = state_lib.create_train_state(
      config, model, state_lib.create_optimizer(config, learning_rate_fn), mesh)
  stepper = steps.Stepper(config, model, learning_rate_fn, mesh)
  rng = np.random.default_rng(0)
  b, m = config.batch_size, config.model
  batch = {"image": rng.random((b, m.image_height, m.image_width, m.image_channels),
                               np.float32)}
  if tasks.get(config).reads_lines:
    digits = ["".join(map(str, rng.integers(0, 10, n)))
              for n in rng.integers(1, config.max_digits + 1, b)]
    batch["tokens"] = tokens.encode_batch(digits, config.max_digits)
  else:
    batch["label"] = rng.integers(0, m.num_classes, b).astype(np.int32)
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    state, step_metrics = stepper(state, batch)
    jax.block_until_ready(step_metrics)
    times.append(time.perf_counter() - start)
  return b / float(np.median(times[1:]))


def estimate(pts: Sequence[Point], *, repeats: int = 3, log=print) -> list[dict]:
  """Times a few train steps of each point here (compiling each) and estimates its run time.

  The estimate is training (num_train_steps * batch_size / measured images/s) plus
  evaluation, taken as greedy decoding of every evaluated example at a third of the training
  rate per image (decoding measured 2-4x faster than a train step; see README's benchmark),
  plus a minute of start-up. Timings taken beside other work are pessimistic.
  """
  out = []
  for p in pts:
    config = resolve_config(p.config, p.overrides)
    rate = train_rate(config, repeats=repeats)
    train_s = config.num_train_steps * config.batch_size / rate
    evals = (config.num_train_steps // config.eval_every_steps
             if config.eval_every_steps > 0 else 0)
    per_eval = config.num_eval_examples if config.num_eval_examples > 0 else 1000
    # The final evaluation: a reader's test split and its files, a classifier's test split.
    eval_examples = evals * per_eval + (5000 if tasks.get(config).reads_lines else 1400)
    seconds = train_s + eval_examples / (3 * rate) + 60
    log(f"{p.label}: {rate:,.0f} train images/s, about {seconds / 60:.0f} min")
    out.append({"label": p.label, "train_images_per_second": rate, "seconds": seconds})
  return out


# ----------------------------------------------------------------------------------------------
# Helpers for the sweeps' conclusion hooks (they read the rows of `rows`)


def pct(value) -> str:
  """0.8734 -> '87.3%'."""
  return fmt("exact_match", value)


def best(table: Sequence[dict], key: str, *, lowest: bool = False) -> dict:
  """The finished row with the highest (or lowest) value of `key`."""
  done = [r for r in ok_rows(table) if key in r]
  return (min if lowest else max)(done, key=lambda r: r[key])


def trend(values: Sequence[float], *, tolerance: float = 0.0) -> str:
  """'rises', 'falls' or 'is not monotonic' along the sequence (steps within `tolerance`
  count as flat)."""
  steps = np.diff(np.asarray(values, np.float64))
  if np.all(steps >= -tolerance) and np.any(steps > tolerance):
    return "rises"
  if np.all(steps <= tolerance) and np.any(steps < -tolerance):
    return "falls"
  return "is flat" if np.all(np.abs(steps) <= tolerance) else "is not monotonic"


def failed_note(table: Sequence[dict]) -> str:
  """A sentence on the points that failed or are missing ('' when none)."""
  notes = [f"{r['label']} ({r['status']}" + (f": {r['error']}" if r.get("error") else "") + ")"
           for r in table if r["status"] != "ok"]
  return f" Not finished: {'; '.join(notes)}." if notes else ""
