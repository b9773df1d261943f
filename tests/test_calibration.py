"""Calibrated line confidence and selective prediction (digit_vit/calibration.py), and the
figures training reports."""

import json
import math

import numpy as np
import pytest

from digit_vit import calibration
from digit_vit.models import tokens


V = tokens.VOCAB_SIZE


def _step(probs: dict[int, float]) -> np.ndarray:
  """One step's log-probabilities [V] with the given token probabilities, -inf elsewhere."""
  row = np.full((V,), -np.inf, np.float32)
  for token, p in probs.items():
    row[token] = math.log(p)
  return row


@pytest.mark.any_device_count  # numpy only
def test_line_confidence_is_the_tempered_product_up_to_eos():
  # "3": p(3) = 0.64 against p(5) = 0.36, then <eos> for sure; past <eos> is ignored.
  steps = np.stack([_step({3: 0.64, 5: 0.36}), _step({tokens.EOS: 1.0}),
                    np.full((V,), 7.0, np.float32)])[None]
  out = np.array([[3, tokens.EOS, tokens.PAD]])
  lines = calibration.Lines(steps, out, np.array([True]))
  assert calibration.confidences(lines, 1.0)[0] == pytest.approx(0.64)
  # At T = 2 the probabilities go as their square roots: 0.8 / (0.8 + 0.6) = 4/7.
  assert calibration.confidences(lines, 2.0)[0] == pytest.approx(4 / 7)
  # T -> 0 makes the argmax certain.
  assert calibration.confidences(lines, 0.05)[0] == pytest.approx(1.0, abs=1e-4)
  # A line that never stopped counts every position.
  never = calibration.Lines(np.stack([_step({3: 0.5, 4: 0.5})] * 3)[None],
                            np.array([[3, 3, 4]]), np.array([False]))
  assert calibration.confidences(never)[0] == pytest.approx(0.125)


@pytest.mark.any_device_count  # numpy only
def test_ece_over_equal_width_bins_on_a_constructed_example():
  # 10 lines at 0.95 (bin 14), 9 right; 10 at 0.25 (bin 3), 5 right:
  # 0.5 * |0.9 - 0.95| + 0.5 * |0.5 - 0.25| = 0.15.
  confidence = np.array([0.95] * 10 + [0.25] * 10)
  correct = np.array([True] * 9 + [False] + [True] * 5 + [False] * 5)
  assert calibration.expected_calibration_error(confidence, correct) == pytest.approx(0.15)
  # 0.10 and 0.12 share the bin [1/15, 2/15): |0.5 - 0.11| (per line it would be 0.51).
  assert calibration.expected_calibration_error([0.10, 0.12], [True, False]) == pytest.approx(
      0.39)
  # A confidence of exactly 1 falls in the last bin; a perfectly calibrated set scores 0.
  assert calibration.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
  assert math.isnan(calibration.expected_calibration_error([], []))


@pytest.mark.any_device_count  # numpy only
def test_coverage_at_accuracy_as_by_hand():
  # 100 lines by decreasing confidence, wrong at ranks 11, 61 and 62 (1-based).
  confidence = 1.0 - np.arange(100) / 200
  correct = np.ones(100, bool)
  correct[[10, 60, 61]] = False
  rng = np.random.default_rng(0)
  order = rng.permutation(100)  # The input order does not matter.
  confidence, correct = confidence[order], correct[order]
  # 98%: the top k with one error are >= 98% right for k >= 50, up to k = 60; with two
  # errors 2 / 61 > 2%. So 60 of 100.
  assert calibration.coverage_at_accuracy(confidence, correct, 0.98) == pytest.approx(0.60)
  # 99%: one error needs k >= 100; the 10 before it are all right.
  assert calibration.coverage_at_accuracy(confidence, correct, 0.99) == pytest.approx(0.10)
  assert calibration.coverage_at_accuracy(confidence, correct, 0.97) == pytest.approx(1.0)
  coverage, risk = calibration.risk_coverage(confidence, correct)
  assert coverage[-1] == 1.0 and risk[-1] == pytest.approx(0.03)
  assert risk[9] == 0.0 and risk[10] == pytest.approx(1 / 11)


@pytest.mark.any_device_count  # numpy only
def test_coverage_keeps_or_drops_tied_confidences_together():
  confidence, correct = [0.9, 0.9, 0.8], [True, False, True]
  coverage, risk = calibration.risk_coverage(confidence, correct)
  np.testing.assert_allclose(coverage, [2 / 3, 1.0])
  np.testing.assert_allclose(risk, [0.5, 1 / 3])
  assert calibration.coverage_at_accuracy(confidence, correct, 0.6) == 1.0
  # Keeping only the right one of the tie would reach 70%, but no threshold does that.
  assert calibration.coverage_at_accuracy(confidence, correct, 0.7) == 0.0


def _overconfident_lines(n: int, true_temperature: float, seed: int = 0) -> calibration.Lines:
  """One-digit lines whose reported distributions are `true_temperature` times sharper than
  the probability that the reading is right."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 1.5, (n, 2)) * true_temperature
  steps = np.full((n, 2, V), -np.inf, np.float32)
  steps[:, 0, :2] = logits - np.logaddexp(logits[:, :1], logits[:, 1:])
  steps[:, 1, tokens.EOS] = 0.0
  out = np.stack([np.argmax(logits, axis=1), np.full(n, tokens.EOS)], axis=1)
  lines = calibration.Lines(steps, out, np.zeros(n, bool))
  right_probability = calibration.confidences(lines, true_temperature)
  return lines._replace(correct=rng.random(n) < right_probability)


@pytest.mark.any_device_count  # numpy only
def test_fit_temperature_recovers_the_temperature_of_overconfident_lines():
  lines = _overconfident_lines(4000, 2.5)
  temperature = calibration.fit_temperature(lines)
  assert temperature == pytest.approx(2.5, rel=0.15)
  record = calibration.calibrate(lines, step=7)
  assert record["temperature"] == temperature and record["step"] == 7
  assert record["validation_ece_calibrated"] < 0.5 * record["validation_ece"]
  assert record["validation_nll_calibrated"] < record["validation_nll"]
  # On other lines of the same model the fitted temperature lowers the ECE too.
  held_out = _overconfident_lines(4000, 2.5, seed=1)
  figures = calibration.split_metrics(held_out, temperature)
  assert figures["ece_calibrated"] < 0.5 * figures["ece"]
  # Degenerate validation sets end at a bound, not at 0 or infinity.
  assert calibration.fit_temperature(lines._replace(correct=np.zeros(4000, bool))) == (
      pytest.approx(calibration.MAX_TEMPERATURE, rel=1e-3))
  assert calibration.fit_temperature(calibration.Lines.concatenate([])) == 1.0


@pytest.mark.any_device_count  # numpy only
def test_the_temperature_file_round_trips(tmp_path):
  assert calibration.load_temperature(tmp_path) == 1.0  # No file: uncalibrated.
  path = calibration.write(tmp_path, {"temperature": 1.75, "step": 30,
                                      "validation_ece": float("nan")})
  assert path == tmp_path / calibration.CALIBRATION_FILE
  assert json.loads(path.read_text())["validation_ece"] is None
  assert calibration.load_temperature(tmp_path) == 1.75
  path.write_text(json.dumps({"temperature": -1}))
  with pytest.raises(ValueError, match="positive"):
    calibration.load_temperature(tmp_path)
  path.write_text("{")
  with pytest.raises(ValueError, match="no temperature"):
    calibration.load_temperature(tmp_path)


# ---- A trained run (the session's tiny run: training fitted and stored its temperature)


def test_training_calibrates_its_confidence_on_validation(tiny_workdir):
  report = json.loads((tiny_workdir / "report.json").read_text())
  record = json.loads((tiny_workdir / calibration.CALIBRATION_FILE).read_text())
  temperature = record["temperature"]
  assert report["temperature"] == temperature == calibration.load_temperature(tiny_workdir)
  # Fitted at the last step on the whole validation split (read at the end: eval_splits).
  assert record["step"] == report["steps"] == 30
  assert record["validation_examples"] == report["validation_num_examples"] == 96
  assert record["decode"] == {"beam_size": 1, "alpha": 0.6, "views": 1}
  # 30 steps read few lines right, with more confidence than that: T > 1 softens it (up to
  # the bound, should validation hold no line read right).
  assert 1.0 < temperature <= calibration.MAX_TEMPERATURE
  assert record["validation_nll_calibrated"] < record["validation_nll"]
  assert record["validation_ece"] == report["validation_ece"]
  assert report["validation_ece_calibrated"] < report["validation_ece"]
  # Not compared on the test split: 100 lines of which a 30-step model reads about 3 right
  # cannot tell ECEs 0.001 apart (held-out lines: test_fit_temperature_recovers_...).
  for split in ("validation", "test"):
    for key in ("coverage_at_98", "coverage_at_99", "ece", "ece_calibrated"):
      assert 0.0 <= report[f"{split}_{key}"] <= 1.0, (split, key)
    # Below 98% of lines right overall, not every line can be kept.
    assert report[f"{split}_exact_match"] < 0.98 and report[f"{split}_coverage_at_98"] < 1.0
    assert report[f"{split}_coverage_at_99"] <= report[f"{split}_coverage_at_98"]
  picture = (tiny_workdir / "risk_coverage.png").read_bytes()
  assert picture.startswith(b"\x89PNG") and len(picture) > 5000


def test_evaluate_stores_the_temperature_only_for_the_runs_default_reading(tiny_workdir):
  from digit_vit import evaluate, trained  # pylint: disable=import-outside-toplevel
  config = trained.load_config(tiny_workdir)
  result = {"checkpoints": ["best"], "ensemble": [], "calibration": {"temperature": 2.0}}
  default = dict(ema=True, num_examples=-1, beam_size=None, alpha=None, views=None)
  assert evaluate.stores_calibration(config, result, **default)
  assert evaluate.stores_calibration(config, result, **{**default, "beam_size": 1})
  for change in ({"num_examples": 16}, {"beam_size": 2}, {"views": 3}, {"ema": False}):
    assert not evaluate.stores_calibration(config, result, **{**default, **change}), change
  assert not evaluate.stores_calibration(
      config, {**result, "checkpoints": ["20", "30"]}, **default)
  assert not evaluate.stores_calibration(
      config, {**result, "ensemble": [{"workdir": "x"}]}, **default)
