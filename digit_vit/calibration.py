"""Calibrated line confidence and selective prediction (numpy only).

A reading's confidence is the probability of the whole line under the decoder,
exp(sum over the written tokens, `<eos>` included, of log_softmax(step_log_probs / T)[token]),
with `step_log_probs` the log-probabilities the decoder picked each token from (for ensembles
and views, the log of the mean probability) and T a temperature (`decode.tempered_log_probs`).
A model trained with cross-entropy is usually over-confident about whole lines, and the
product of many per-token probabilities compounds it, so T is fitted on the validation split
(`fit_temperature`) and stored in the run (`CALIBRATION_FILE`, `load_temperature`); the reader
and the exported model then report calibrated confidences. T changes no reading.

Selective prediction: a user who acts only on readings above a confidence threshold trades
coverage (the fraction of lines kept) for accuracy on the kept ones. `coverage_at_accuracy`
gives the largest coverage whose sequence accuracy reaches a target (Goodfellow et al. 2014:
95.64% coverage at 98% accuracy on SVHN house numbers), `risk_coverage` the whole trade-off.

Shapes: n lines, L token positions (a row of raw decoder outputs without `<sos>`), V tokens.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping, NamedTuple

import numpy as np

from digit_vit.models import tokens as tokens_lib

CALIBRATION_FILE = "calibration.json"
# Sequence accuracies the reports give coverage at (`coverage_at_98`, `coverage_at_99`).
COVERAGE_TARGETS = (0.98, 0.99)
ECE_BINS = 15
# The search range of the temperature: outside it a fit says more about a degenerate
# validation set (every line right, or every line wrong) than about the model.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# Confidences are kept this far from 0 and 1 in the likelihood, so one line the model is
# certain of and wrong about does not make it infinite.
_EPS = 1e-7


class Lines(NamedTuple):
  """What calibration needs of a set of readings.

  Attributes:
    step_log_probs: float32 [n, L, V] the (untempered) log-probabilities each token was picked
      from; rows after a line's `<eos>` are ignored.
    tokens: int32 [n, L] the raw outputs (no `<sos>`).
    correct: bool [n] whether each reading is exactly right (`metrics.exact_matches`).
  """
  step_log_probs: np.ndarray
  tokens: np.ndarray
  correct: np.ndarray

  @classmethod
  def concatenate(cls, parts) -> "Lines":
    """Lines of several batches as one; rows padded to the longest L (ignored positions)."""
    parts = list(parts)
    if not parts:
      return cls(np.zeros((0, 1, tokens_lib.VOCAB_SIZE), np.float32),
                 np.full((0, 1), tokens_lib.PAD, np.int32), np.zeros((0,), bool))
    length = max(p.tokens.shape[1] for p in parts)

    def pad(x, value):
      widths = [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
      return np.pad(x, widths, constant_values=value)

    return cls(np.concatenate([pad(np.asarray(p.step_log_probs, np.float32), 0.0)
                               for p in parts]),
               np.concatenate([pad(np.asarray(p.tokens, np.int32), tokens_lib.PAD)
                               for p in parts]),
               np.concatenate([np.asarray(p.correct, bool) for p in parts]))


def certain_step(length: int, vocab: int = tokens_lib.VOCAB_SIZE) -> np.ndarray:
  """float32 [length, V] step log-probs of a line read as certainly empty (an image with no
  ink: `<eos>` at probability 1 at every T), for `Lines` rows of readings the model never
  made."""
  row = np.full((length, vocab), -np.inf, np.float32)
  row[:, tokens_lib.EOS] = 0.0
  return row


def written_mask(tokens) -> np.ndarray:
  """bool [n, L]: the positions a reading wrote, up to and including its first `<eos>` (all
  of them for a reading that never stopped)."""
  tokens = np.asarray(tokens)
  eos = tokens == tokens_lib.EOS
  return (np.cumsum(eos, axis=1) - eos) == 0


def line_log_probs(step_log_probs, tokens, temperature: float = 1.0) -> np.ndarray:
  """float64 [n]: each line's log-confidence at `temperature`.

  Args:
    step_log_probs: float [n, L, V]; tokens: int [n, L] (see `Lines`).
  """
  logits = np.asarray(step_log_probs, np.float64) / float(temperature)
  top = np.max(logits, axis=-1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  log_norm = np.log(np.sum(np.exp(logits - top), axis=-1)) + top[..., 0]
  tokens = np.asarray(tokens)
  chosen = np.take_along_axis(logits, tokens[..., None].astype(np.int64), axis=-1)[..., 0]
  per_token = np.where(written_mask(tokens), chosen - log_norm, 0.0)
  return per_token.sum(axis=1)


def confidences(lines: Lines, temperature: float = 1.0) -> np.ndarray:
  """float64 [n] in [0, 1]: each line's confidence at `temperature`."""
  return np.exp(line_log_probs(lines.step_log_probs, lines.tokens, temperature))


def correctness_nll(confidence, correct) -> float:
  """The mean negative log-likelihood of `correct` (bool [n]) when each line is right with
  probability `confidence` (float [n]); `_EPS` keeps it finite."""
  p = np.clip(np.asarray(confidence, np.float64), _EPS, 1.0 - _EPS)
  y = np.asarray(correct, bool)
  return float(-np.mean(np.where(y, np.log(p), np.log1p(-p)))) if y.size else float("nan")


def fit_temperature(lines: Lines, *, bounds=(MIN_TEMPERATURE, MAX_TEMPERATURE)) -> float:
  """The temperature that best predicts which readings are exactly right.

  It minimises `correctness_nll` of the lines' confidences, a one-parameter logistic-style fit
  of "the greedy reading is exactly right": the confidence is what users act on, and this
  scores it directly, where the teacher-forced token NLL calibrates each token on the true
  prefix, a distribution the free-running reader never sees after its first mistake. The
  search is over log T in `bounds` (a coarse grid, then golden-section refinement), so a
  validation set where every line is right (or wrong) ends at a bound rather than at 0 (or
  infinity). With no lines, 1.0.

  Args:
    lines: the validation readings (`Lines`).

  Returns:
    T > 0, a Python float.
  """
  if len(lines.correct) == 0:
    return 1.0
  lo, hi = math.log(bounds[0]), math.log(bounds[1])

  def loss(log_t):
    return correctness_nll(confidences(lines, math.exp(log_t)), lines.correct)

  grid = np.linspace(lo, hi, 41)
  losses = [loss(g) for g in grid]
  best = int(np.argmin(losses))
  a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
  ratio = (math.sqrt(5.0) - 1.0) / 2.0
  c, d = b - ratio * (b - a), a + ratio * (b - a)
  fc, fd = loss(c), loss(d)
  for _ in range(30):
    if fc < fd:
      b, d, fd = d, c, fc
      c = b - ratio * (b - a)
      fc = loss(c)
    else:
      a, c, fc = c, d, fd
      d = a + ratio * (b - a)
      fd = loss(d)
  candidates = [(losses[best], grid[best]), (fc, c), (fd, d)]
  return float(math.exp(min(candidates)[1]))


def expected_calibration_error(confidence, correct, num_bins: int = ECE_BINS) -> float:
  """Expected calibration error over `num_bins` equal-width confidence bins.

  Bin k holds the lines with confidence in [k / B, (k + 1) / B) (the last bin includes 1);
  ECE = sum over bins of (lines in bin / n) * |accuracy in bin - mean confidence in bin|.
  Equal-width bins, as Guo et al. 2017, so figures compare across runs; NaN for no lines.

  Args:
    confidence: float [n] in [0, 1]; correct: bool [n].
  """
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, np.float64)
  if confidence.size == 0:
    return float("nan")
  bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
  # |sum(correct) - sum(confidence)| in a bin is its count times |accuracy - confidence|.
  gap = np.abs(np.bincount(bins, correct, num_bins) - np.bincount(bins, confidence, num_bins))
  return float(gap.sum() / confidence.size)


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
  """The risk-coverage curve: keep the lines above each confidence threshold.

  Lines are taken by decreasing confidence; a threshold cannot split lines of equal
  confidence, so the curve has a point only where the confidence changes (after the last of
  a tie).

  Args:
    confidence: float [n]; correct: bool [n].

  Returns:
    (coverage, risk) float64 [m] each, m the number of distinct confidences: the fraction of
    lines kept and the fraction of the kept ones that are wrong, by increasing coverage.
  """
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, bool)
  n = confidence.size
  if n == 0:
    return np.zeros((0,)), np.zeros((0,))
  order = np.argsort(-confidence, kind="stable")
  sorted_confidence = confidence[order]
  right = np.cumsum(correct[order])
  kept = np.arange(1, n + 1)
  ends = np.flatnonzero(np.append(sorted_confidence[1:] != sorted_confidence[:-1], True))
  return kept[ends] / n, 1.0 - right[ends] / kept[ends]


def coverage_at_accuracy(confidence, correct, target: float) -> float:
  """The largest fraction of lines, taken by decreasing confidence, whose sequence accuracy
  is at least `target` (`risk_coverage`'s thresholds; ties kept or dropped together); 0.0 if
  no threshold reaches it, NaN for no lines.

  Args:
    confidence: float [n]; correct: bool [n]; target: in [0, 1].
  """
  coverage, risk = risk_coverage(confidence, correct)
  if coverage.size == 0:
    return float("nan")
  # A small tolerance: 49 right of 50 is accuracy 0.98 though 1 - 1/50 rounds below it.
  reached = (1.0 - risk) >= target - 1e-12
  return float(coverage[reached].max()) if reached.any() else 0.0


def split_metrics(lines: Lines, temperature: float) -> dict[str, float]:
  """A split's selective-prediction figures, keyed as in the reports (prefixed by the split):
  `coverage_at_98`, `coverage_at_99` (ranked by the calibrated confidence, which users
  threshold), `ece` (at T = 1) and `ece_calibrated` (at `temperature`)."""
  calibrated = confidences(lines, temperature)
  out = {f"coverage_at_{round(100 * t)}": coverage_at_accuracy(calibrated, lines.correct, t)
         for t in COVERAGE_TARGETS}
  out["ece"] = expected_calibration_error(confidences(lines, 1.0), lines.correct)
  out["ece_calibrated"] = expected_calibration_error(calibrated, lines.correct)
  return out


def calibrate(validation: Lines, *, step: int, decoding: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
  """Fits the temperature on the validation readings; returns the calibration record that
  `write` stores: {'temperature', 'step', 'validation_examples', 'validation_ece',
  'validation_ece_calibrated', 'validation_nll', 'validation_nll_calibrated', 'decode'}."""
  temperature = fit_temperature(validation)
  before, after = confidences(validation, 1.0), confidences(validation, temperature)
  return {
      "temperature": temperature,
      "step": int(step),
      "validation_examples": int(len(validation.correct)),
      "validation_ece": expected_calibration_error(before, validation.correct),
      "validation_ece_calibrated": expected_calibration_error(after, validation.correct),
      "validation_nll": correctness_nll(before, validation.correct),
      "validation_nll_calibrated": correctness_nll(after, validation.correct),
      "decode": dict(decoding or {}),
  }


def write(workdir: str | os.PathLike, record: Mapping[str, Any]) -> pathlib.Path:
  """Writes `workdir/calibration.json` (through a renamed temporary file: a reader never sees
  half of it)."""
  path = pathlib.Path(workdir) / CALIBRATION_FILE
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(_json_safe(record), indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)
  return path


def load_temperature(workdir: str | os.PathLike) -> float:
  """The run's calibration temperature (`workdir/calibration.json`), 1.0 when there is none.

  Raises:
    ValueError: the file exists but holds no positive finite temperature.
  """
  path = pathlib.Path(workdir) / CALIBRATION_FILE
  if not path.is_file():
    return 1.0
  try:
    temperature = float(json.loads(path.read_text())["temperature"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} holds no temperature: {e}") from e
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f"{path}: temperature must be positive and finite, got {temperature}")
  return temperature


def plot_risk_coverage(curves: Mapping[str, Lines], temperature: float,
                       path: str | os.PathLike) -> pathlib.Path:
  """Writes the risk-coverage curve of each split (name -> its lines, ranked by the
  calibrated confidence) as one PNG, with the 2% and 1% risk levels of `coverage_at_98/99`
  drawn in."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, lines in curves.items():
    if lines is None:
      continue
    coverage, risk = risk_coverage(confidences(lines, temperature), lines.correct)
    if coverage.size:
      ax.step(np.concatenate([[0.0], coverage]), np.concatenate([[risk[0]], risk]),
              where="post", label=f"{name} ({len(lines.correct)} lines)")
  for target in COVERAGE_TARGETS:
    ax.axhline(1.0 - target, color="grey", linestyle=":", linewidth=0.8)
  ax.set_xlabel("coverage (lines kept, most confident first)")
  ax.set_ylabel("risk (kept lines read wrong)")
  ax.set_xlim(0, 1)
  ax.set_ylim(bottom=0)
  ax.set_title(f"risk-coverage, temperature {temperature:.3g}")
  ax.grid(alpha=0.3)
  if curves:
    ax.legend(loc="upper left")
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _json_safe(value):
  """NaN and infinities as None (JSON has neither)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {k: _json_safe(v) for k, v in value.items()}
  return value


def selective_report(lines_by_split: Mapping[str, Lines], validation: Lines, *, step: int,
                     decoding: Mapping[str, Any] | None = None
                     ) -> tuple[dict[str, Any], dict[str, float]]:
  """Fits the temperature on `validation` and scores every split with it.

  Args:
    lines_by_split: each evaluated split's readings (None: none to score).
    validation: the readings the temperature is fitted on.
    step, decoding: what was read (stored in the record).

  Returns:
    (record, figures): the calibration record (`calibrate`) and the report's keys:
    `temperature` and `<split>_coverage_at_98`, `<split>_coverage_at_99`, `<split>_ece`,
    `<split>_ece_calibrated` for each split.
  """
  record = calibrate(validation, step=step, decoding=decoding)
  figures: dict[str, float] = {"temperature": record["temperature"]}
  for split, lines in lines_by_split.items():
    if lines is None:  # A split read by a reader that gave no distributions.
      continue
    figures.update({f"{split}_{k}": v
                    for k, v in split_metrics(lines, record["temperature"]).items()})
  return record, figures
