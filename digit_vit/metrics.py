"""Evaluation metrics as sums over a batch (jit-friendly jnp; numpy inputs work too).

A step returns sums (of correct tokens, of edit distances, of examples, ...) rather than means,
so batches, devices and hosts combine by adding, and `summarize` divides once at the end.
Masked rows (padding of the last evaluation batch) add nothing.

Digit-reader metrics compare a free-running output (raw tokens without `<sos>`, e.g.
`[1, 0, 1, <eos>, <pad>, ...]`) with the target (the full sequence without `<sos>`):

- exact_match: the output equals the target on every position up to and including the
  target's `<eos>` (the right digits, then a stop).
- token_accuracy: the fraction of those target positions the output gets right.
- cer: Levenshtein distance between the digits read (as `tokens.read_output` reads them:
  digit tokens before the first `<eos>`) and the target's digits, over the target's digits;
  summed over the set before dividing (a corpus-level CER).
- no_eos: how many outputs never emitted `<eos>` (ran to the maximum length).
- wrong_length: how many outputs read a different number of digits than the target has (the
  seeds' "did not learn when to stop": stopping early, late, or never).
- order_errors: how many outputs read the target's digits in another order (the digits read
  differ from the target's, but sorted they are the same multiset: 731 read as 137).
- exact_match_length_n: exact match among targets of n digits.
- read_length_n: the mean number of digits read for targets of n digits (shows where a model
  stops on lines longer than any it was trained on).
- cer_length_n: the CER among targets of n digits; num_examples_length_n: how many there are
  (`length_cer` combines them into the CER of a range of lengths).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from digit_vit import tasks
from digit_vit.models import tokens as tokens_lib


def _mask(mask, batch):
  return (jnp.ones((batch,), jnp.float32) if mask is None
          else jnp.asarray(mask).astype(jnp.float32))


def weighted_accuracy(logits, targets, weights):
  """(correct, count) of argmax predictions where weights > 0.

  Args:
    logits: float [batch, ..., classes]; targets: int [batch, ...]; weights: [batch, ...].
  """
  counted = (weights > 0).astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(correct * counted), jnp.sum(counted)


def edit_distance(a, a_length, b, b_length):
  """Levenshtein distance between the first a_length tokens of each row of `a` and the first
  b_length of `b` (unit insert, delete and substitute costs).

  Args:
    a: int [batch, m]; a_length: int [batch] in 0..m.
    b: int [batch, n]; b_length: int [batch] in 0..n.

  Returns:
    int32 [batch].
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  batch, m = a.shape
  n = b.shape[1]
  columns = jnp.arange(n + 1, dtype=jnp.int32)
  row = jnp.broadcast_to(columns, (batch, n + 1))  # D[0, j] = j.
  rows = [row]
  for i in range(1, m + 1):
    substitute = row[:, :-1] + (a[:, i - 1:i] != b).astype(jnp.int32)
    # Without insertions along the row, D[i, j] = min(delete, substitute); insertions then
    # give D[i, j] = min_k<=j (that + j - k), a running minimum of (that - k) plus j.
    no_insert = jnp.concatenate(
        [jnp.full((batch, 1), i, jnp.int32), jnp.minimum(row[:, 1:] + 1, substitute)], axis=1)
    row = jax.lax.cummin(no_insert - columns, axis=1) + columns
    rows.append(row)
  table = jnp.stack(rows, axis=1)  # [batch, m + 1, n + 1]
  at_a = jnp.take_along_axis(table, a_length[:, None, None], axis=1)[:, 0]
  return jnp.take_along_axis(at_a, b_length[:, None], axis=1)[:, 0]


def _digits_read(outputs):
  """Raw outputs [batch, L] -> (digits [batch, L] left-aligned, count [batch]): the digit
  tokens before the first `<eos>`, as `tokens.read_output` reads them."""
  before_eos = jnp.cumsum(outputs == tokens_lib.EOS, axis=1) == 0
  keep = before_eos & (outputs < tokens_lib.NUM_DIGITS)
  # A stable sort on "not kept" moves the kept tokens to the front in their order.
  order = jnp.argsort(~keep, axis=1, stable=True)
  return jnp.take_along_axis(outputs, order, axis=1), jnp.sum(keep, axis=1)


def _same_length(outputs, targets):
  """Both to the longer length, with <pad>: a reading longer than the target is compared (and
  its extra digits counted) in full."""
  outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
  length = max(outputs.shape[1], targets.shape[1])
  return tuple(jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=tokens_lib.PAD)
               for x in (outputs, targets))


def exact_matches(outputs, targets) -> np.ndarray:
  """bool [batch]: whether each reading is exact, as `reading_sums` counts `exact_match` (the
  per-line verdicts that calibration fits the confidence to).

  Args:
    outputs: int [batch, Lo] raw outputs; targets: int [batch, L] (no `<sos>`).
  """
  outputs, targets = np.asarray(outputs), np.asarray(targets)
  length = max(outputs.shape[1], targets.shape[1])
  outputs, targets = (np.pad(x, ((0, 0), (0, length - x.shape[1])),
                             constant_values=tokens_lib.PAD) for x in (outputs, targets))
  scored = targets != tokens_lib.PAD
  return np.all((outputs == targets) | ~scored, axis=1)


def reading_sums(outputs, targets, mask=None, *, max_digits: int):
  """Sums of the digit-reader metrics over a batch (see the module docstring).

  Args:
    outputs: int [batch, Lo] free-running raw outputs (no `<sos>`), of any length Lo.
    targets: int [batch, L] targets (the full sequence without `<sos>`).
    mask: optional bool [batch]; False rows are left out.
    max_digits: the longest line (sizes the per-length sums).

  Returns:
    dict of float32 sums: count, exact_match, token_correct, token_count, edit_distance,
    reference_digits, no_eos, wrong_length, order_errors, and [max_digits + 1] arrays
    length_count, length_exact, length_read_digits, length_edit_distance (index n = targets of
    n digits).
  """
  outputs, targets = _same_length(outputs, targets)
  m = _mask(mask, targets.shape[0])
  scored = targets != tokens_lib.PAD  # The digits and the <eos>.
  right = (outputs == targets) & scored
  exact = jnp.all(right | ~scored, axis=1).astype(jnp.float32)
  reference_digits = jnp.sum(targets < tokens_lib.NUM_DIGITS, axis=1)
  read, read_count = _digits_read(outputs)
  distance = edit_distance(read, read_count, targets, reference_digits).astype(jnp.float32)
  no_eos = ~jnp.any(outputs == tokens_lib.EOS, axis=1)
  wrong_length = read_count != reference_digits
  order_error = _order_errors(read, read_count, targets, reference_digits)
  by_length = jax.nn.one_hot(reference_digits, max_digits + 1, dtype=jnp.float32) * m[:, None]
  return {
      "count": jnp.sum(m),
      "exact_match": jnp.sum(exact * m),
      "token_correct": jnp.sum(jnp.sum(right, axis=1) * m),
      "token_count": jnp.sum(jnp.sum(scored, axis=1) * m),
      "edit_distance": jnp.sum(distance * m),
      "reference_digits": jnp.sum(reference_digits * m),
      "no_eos": jnp.sum(no_eos * m),
      "wrong_length": jnp.sum(wrong_length * m),
      "order_errors": jnp.sum(order_error * m),
      "length_count": jnp.sum(by_length, axis=0),
      "length_exact": jnp.sum(by_length * exact[:, None], axis=0),
      "length_read_digits": jnp.sum(by_length * read_count[:, None].astype(jnp.float32), axis=0),
      "length_edit_distance": jnp.sum(by_length * distance[:, None], axis=0),
  }


def _order_errors(read, read_count, targets, reference_digits):
  """Whether each reading is a reordering of the target's digits, but not the target itself.

  Args:
    read: int [batch, L] digits read, left-aligned (`_digits_read`); read_count: int [batch].
    targets: int [batch, L] targets, digits first; reference_digits: int [batch].

  Returns:
    bool [batch].
  """
  positions = jnp.arange(read.shape[1])
  # Positions past each row's digits get a sentinel above every digit, so they sort last and
  # compare equal; unequal counts already differ at position min(count).
  sentinel = tokens_lib.NUM_DIGITS
  read = jnp.where(positions < read_count[:, None], read, sentinel)
  target = jnp.where(positions < reference_digits[:, None], targets, sentinel)
  same_digits = jnp.all(jnp.sort(read, axis=1) == jnp.sort(target, axis=1), axis=1)
  same_order = jnp.all(read == target, axis=1)
  return same_digits & ~same_order


def classification_sums(logits, labels, mask=None):
  """Sums for the classifier: count and correct (argmax == label), masked rows left out."""
  m = _mask(mask, labels.shape[0])
  correct, count = weighted_accuracy(logits, labels, m)
  return {"count": count, "correct": correct}


def add_sums(total: Mapping | None, sums: Mapping) -> dict:
  """Adds two dicts of sums (host-side numpy float64, so long evaluations stay exact)."""
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  if total is None:
    return sums
  return {k: total[k] + sums[k] for k in total}


def summarize(sums: Mapping) -> dict[str, float]:
  """Sums of a whole evaluation -> the metrics (plain floats, keyed as in the report)."""
  s = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  ratio = lambda num, den: float(num / den) if den > 0 else float("nan")  # noqa: E731
  out = {"num_examples": int(s["count"])}
  if "loss" in s:
    out["loss"] = ratio(s["loss"], s["weight"])
  if "correct" in s:
    out["accuracy"] = ratio(s["correct"], s["count"])
  if "exact_match" in s:
    out["exact_match"] = ratio(s["exact_match"], s["count"])
    out["token_accuracy"] = ratio(s["token_correct"], s["token_count"])
    out["cer"] = ratio(s["edit_distance"], s["reference_digits"])
    out["no_eos"] = int(s["no_eos"])
    out["wrong_length"] = int(s["wrong_length"])
    out["order_errors"] = int(s["order_errors"])
    for n in range(1, len(s["length_count"])):
      if s["length_count"][n] > 0:
        out[f"exact_match_length_{n}"] = ratio(s["length_exact"][n], s["length_count"][n])
        out[f"read_length_{n}"] = ratio(s["length_read_digits"][n], s["length_count"][n])
        out[f"cer_length_{n}"] = ratio(s["length_edit_distance"][n], n * s["length_count"][n])
        out[f"num_examples_length_{n}"] = int(s["length_count"][n])
  return out


def length_cer(metrics: Mapping, lengths, prefix: str = "") -> float:
  """The corpus CER over lines of the given lengths, from `summarize`'s per-length metrics
  (`<prefix>cer_length_n`, `<prefix>num_examples_length_n`); nan if none was read."""
  edits = digits = 0.0
  for n in lengths:
    count = metrics.get(f"{prefix}num_examples_length_{n}", 0)
    if count and f"{prefix}cer_length_{n}" in metrics:
      edits += metrics[f"{prefix}cer_length_{n}"] * n * count
      digits += n * count
  return edits / digits if digits else float("nan")


def main_metric(config) -> str:
  """The metric of `summarize` that ranks a run's checkpoints (higher is better), read on the
  validation split: the task's `tasks.Task.main_metric` (a reader's exact match, a
  classifier's accuracy)."""
  return tasks.get(config).main_metric
