"""Sequence metrics against hand-worked examples and a plain-Python edit distance."""

import functools

import jax
import numpy as np
import pytest

from digit_vit import metrics
from digit_vit.models import tokens

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count

EOS, PAD = tokens.EOS, tokens.PAD


def levenshtein(a, b):
  """Textbook dynamic programme."""
  d = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    prev, d[0] = d[0], i
    for j, y in enumerate(b, 1):
      prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
  return d[len(b)]


def test_edit_distance_matches_textbook():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 3, (200, 7))
  b = rng.integers(0, 3, (200, 6))
  la, lb = rng.integers(0, 8, 200), rng.integers(0, 7, 200)
  got = np.asarray(jax.jit(metrics.edit_distance)(a, la, b, lb))
  want = [levenshtein(a[i, :la[i]].tolist(), b[i, :lb[i]].tolist()) for i in range(200)]
  np.testing.assert_array_equal(got, want)
  assert levenshtein("kitten", "sitting") == 3  # The reference itself is right.


def _targets(*digit_strings, max_digits=4):
  return tokens.encode_batch(digit_strings, max_digits)[:, 1:]


def test_reading_sums_hand_worked():
  targets = _targets("101", "7", "42", "1234", "55")
  outputs = np.array([
      [1, 0, 1, EOS, PAD],    # right.
      [7, 7, EOS, PAD, PAD],  # an extra digit: 1 of 2 scored positions right, distance 1.
      [4, 2, 2, 2, 2],        # never stops: 2 of 3 right, reads "42222", distance 3.
      [1, 3, 3, 4, EOS],      # one substitution: 4 of 5 right, distance 1.
      [5, 5, EOS, PAD, PAD],  # right, but masked out.
  ], np.int32)
  mask = np.array([True, True, True, True, False])
  sums = metrics.reading_sums(outputs, targets, mask, max_digits=4)
  got = {k: np.asarray(v).tolist() for k, v in sums.items()}
  assert got["count"] == 4
  assert got["exact_match"] == 1
  assert got["token_correct"] == 4 + 1 + 2 + 4
  assert got["token_count"] == 4 + 2 + 3 + 5
  assert got["edit_distance"] == 0 + 1 + 3 + 1
  assert got["reference_digits"] == 3 + 1 + 2 + 4
  assert got["no_eos"] == 1
  assert got["length_count"] == [0, 1, 1, 1, 1]
  assert got["length_exact"] == [0, 0, 0, 1, 0]
  assert got["length_edit_distance"] == [0, 1, 3, 0, 1]

  summary = metrics.summarize(sums)
  assert summary["exact_match"] == pytest.approx(0.25)
  assert summary["token_accuracy"] == pytest.approx(11 / 14)
  assert summary["cer"] == pytest.approx(5 / 10)
  assert summary["no_eos"] == 1
  assert summary["cer_length_2"] == pytest.approx(3 / 2)
  assert summary["cer_length_4"] == pytest.approx(1 / 4)
  assert summary["num_examples_length_3"] == 1
  # A range of lengths weighs each by its digits; all of them give the whole CER back.
  assert metrics.length_cer(summary, range(1, 3)) == pytest.approx((1 + 3) / (1 + 2))
  assert metrics.length_cer(summary, range(1, 5)) == pytest.approx(summary["cer"])
  assert np.isnan(metrics.length_cer(summary, [7]))
  assert summary["exact_match_length_3"] == 1.0
  assert summary["exact_match_length_2"] == 0.0


def test_cer_reads_digits_as_read_output_does():
  """Random raw outputs: the digits the metric reads are tokens.read_output's digits."""
  rng = np.random.default_rng(1)
  targets = _targets(*["".join(map(str, rng.integers(0, 10, rng.integers(1, 5))))
                       for _ in range(64)])
  outputs = rng.choice(np.array([0, 1, 2, 3, EOS, PAD, tokens.SOS]), size=(64, 5))
  sums = metrics.reading_sums(outputs, targets, max_digits=4)
  want = sum(levenshtein(tokens.read_output(o).digits, tokens.decode_sequence(
      np.concatenate([[tokens.SOS], t]))) for o, t in zip(outputs, targets))
  assert float(sums["edit_distance"]) == want
  assert float(sums["no_eos"]) == sum(not tokens.read_output(o).ended for o in outputs)


def test_short_outputs_are_padded():
  targets = _targets("12", "3")
  outputs = np.array([[1, 2, EOS], [3, EOS, PAD]], np.int32)  # max_length 3 < 5.
  sums = metrics.reading_sums(outputs, targets, max_digits=4)
  assert float(sums["exact_match"]) == 2


def test_classification_sums_and_accumulation():
  logits = np.eye(4)[[0, 1, 2, 3]] * 5.0
  labels = np.array([0, 1, 0, 3])
  sums = metrics.classification_sums(logits, labels, np.array([True, True, True, False]))
  assert float(sums["count"]) == 3 and float(sums["correct"]) == 2
  total = metrics.add_sums(None, {**sums, "loss": 3.0, "weight": 3.0})
  total = metrics.add_sums(total, {"count": 1.0, "correct": 1.0, "loss": 1.0, "weight": 1.0})
  summary = metrics.summarize(total)
  assert summary == {"num_examples": 4, "loss": 1.0, "accuracy": 0.75}


def test_wrong_length_and_order_errors_hand_worked():
  """The seeds' failure modes, counted on hand-made rows: stopping at the wrong place, and
  reading the right digits in the wrong order (731 read as 137)."""
  targets = _targets("731", "731", "12", "1122", "5", "90", "4", "33", max_digits=4)
  outputs = np.array([
      [1, 3, 7, EOS, PAD],    # 731 read as 137: an order error, right length.
      [7, 3, 1, EOS, PAD],    # right.
      [1, 2, 2, EOS, PAD],    # an extra digit: wrong length, not an order error.
      [2, 1, 1, 2, EOS],      # 1122 read as 2112: an order error.
      [5, 5, 5, 5, 5],        # never stops: wrong length (reads 5 digits), no <eos>.
      [EOS, PAD, PAD, PAD, PAD],  # stops at once: wrong length (reads nothing).
      [4, EOS, PAD, PAD, PAD],    # right, but masked out.
      [3, 3, EOS, PAD, PAD],  # right: equal digits swapped are the same reading, no error.
  ], np.int32)
  mask = np.array([True] * 6 + [False, True])
  sums = metrics.reading_sums(outputs, targets, mask, max_digits=4)
  assert float(sums["wrong_length"]) == 3
  assert float(sums["order_errors"]) == 2
  assert float(sums["no_eos"]) == 1
  assert float(sums["exact_match"]) == 2
  # Digits read, by target length: 1 digit -> "55555"; 2 -> "122" and ""; 3 -> 3 + 3;
  # 4 -> 4; the masked 1-digit row adds nothing.
  assert np.asarray(sums["length_read_digits"]).tolist() == [0, 5, 3 + 0 + 2, 6, 4]
  summary = metrics.summarize(sums)
  assert summary["wrong_length"] == 3 and summary["order_errors"] == 2
  assert summary["read_length_1"] == 5.0
  assert summary["read_length_2"] == pytest.approx(5 / 3)
  assert summary["read_length_3"] == 3.0 and summary["read_length_4"] == 4.0


def test_order_errors_match_a_plain_python_count():
  rng = np.random.default_rng(2)
  truths = ["".join(map(str, rng.integers(0, 4, rng.integers(1, 5)))) for _ in range(128)]
  targets = _targets(*truths)
  # Shuffled truths (often a permutation), some with a changed, an extra or a lost digit.
  outputs = []
  for t in truths:
    digits = [int(d) for d in rng.permutation(list(t))]
    change = rng.random()
    if change < 0.15:
      digits[0] = (digits[0] + 1) % 4
    elif change < 0.3:
      digits = digits + [0]
    elif change < 0.4:
      digits = digits[1:]
    outputs.append((digits + [EOS] + [PAD] * 5)[:5])
  outputs = np.array(outputs, np.int32)
  sums = jax.jit(functools.partial(metrics.reading_sums, max_digits=4))(outputs, targets)
  readings = [tokens.read_output(o).digits for o in outputs]
  want_order = sum(r != t and sorted(r) == sorted(t) for r, t in zip(readings, truths))
  want_length = sum(len(r) != len(t) for r, t in zip(readings, truths))
  assert want_order > 10 and want_length > 5  # The rows exercise both.
  assert float(sums["order_errors"]) == want_order
  assert float(sums["wrong_length"]) == want_length
