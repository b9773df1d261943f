"""Masked, weighted cross-entropy that returns sums, so callers normalise once, globally.

Like the Flax wmt example, the loss is returned as `(loss_sum, weight_sum)` rather than a mean:
a data-parallel step adds both over every device (and host) and divides once, so the loss is
normalised by the global count of weighted tokens however the batch is split.

Token weights (digit reader) are the product of
  - the example mask (False = a padding row of an evaluation batch),
  - 0 on `<pad>` targets when `ignore_pad` (the default; `<eos>` always counts, so the model
    learns when to stop), 1 otherwise (the seeds' "pad counted" variant),
  - an optional per-class weight (the seeds' "loss adventures": digit 9 x2, `<eos>`/`<pad>`
    x0.5), from `config.loss.class_weights` as a dict or a string '9:2,eos:0.5,pad:0.5'.

`ctc_loss` is the optional auxiliary loss on the reader's CTC head (`config.loss.ctc_weight`),
summed over lines in the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from digit_vit.models import tokens as tokens_lib


def parse_class_weights(class_weights: Mapping[str, float] | str | None) -> dict[str, float]:
  """A config's class weights -> {key: weight}.

  Accepts a mapping (`{'9': 2.0, 'eos': 0.5}`, as a config file may write it) or the string
  form that a command line can set (`--config.loss.class_weights=9:2,eos:0.5,pad:0.5`):
  comma-separated `key:weight` pairs, spaces allowed; '' or None is no weighting.
  """
  if class_weights is None:
    return {}
  if not isinstance(class_weights, str):
    return {str(k): float(v) for k, v in dict(class_weights).items()}
  parsed = {}
  for item in class_weights.split(","):
    if not item.strip():
      continue
    key, sep, weight = item.partition(":")
    try:
      if not sep:
        raise ValueError("no ':'")
      parsed[key.strip()] = float(weight)
    except ValueError as e:
      raise ValueError(f"loss.class_weights item {item.strip()!r} is not 'key:weight' (e.g. "
                       f"'9:2,eos:0.5,pad:0.5'): {e}") from None
  return parsed


def class_weight_vector(class_weights: Mapping[str, float] | str | None,
                        num_classes: int) -> np.ndarray:
  """A config's class weights -> float32 [num_classes] (unnamed classes weigh 1).

  Keys are class indices as strings ('9', '11') or token names with or without brackets
  ('eos', '<pad>'), so `{'9': 2.0, 'eos': 0.5, 'pad': 0.5}`, or the string
  `'9:2,eos:0.5,pad:0.5'` (see `parse_class_weights`), is the seeds' experiment.
  """
  vector = np.ones((num_classes,), np.float32)
  names = {name.strip("<>"): i for i, name in enumerate(tokens_lib.TOKEN_NAMES)}
  for key, weight in parse_class_weights(class_weights).items():
    key = str(key).strip().strip("<>")
    index = int(key) if key.isdigit() else names.get(key)
    if index is None or not 0 <= index < num_classes:
      raise ValueError(f"loss.class_weights key {key!r} is not a class index in "
                       f"0..{num_classes - 1} or a token name {sorted(names)}")
    vector[index] = float(weight)
  return vector


def token_weights(targets, *, mask=None, ignore_pad: bool = True, class_weights=None):
  """Per-target weights.

  Args:
    targets: int [batch, ...] target classes.
    mask: optional bool [batch]; False rows weigh 0.
    ignore_pad: give `<pad>` targets weight 0.
    class_weights: optional float [num_classes], multiplied in by target class.

  Returns:
    float32 weights with the shape of `targets`.
  """
  weights = jnp.ones(targets.shape, jnp.float32)
  if ignore_pad:
    weights = jnp.where(targets == tokens_lib.PAD, 0.0, weights)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[targets]
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)
    weights = weights * mask.reshape(mask.shape + (1,) * (targets.ndim - 1))
  return weights


def weighted_cross_entropy(logits, targets, weights, *, label_smoothing: float = 0.0):
  """Summed weighted cross-entropy.

  With label smoothing s the target distribution is (1 - s) * one_hot + s / num_classes (as
  `optax.smooth_labels`), so the loss of a perfect prediction is the smoothed distribution's
  entropy, not 0.

  Args:
    logits: float [batch, ..., num_classes].
    targets: int [batch, ...].
    weights: float [batch, ...] (see `token_weights`).
    label_smoothing: s in [0, 1).

  Returns:
    (loss_sum, weight_sum): float32 scalars; the mean loss is loss_sum / weight_sum.
  """
  if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
    raise ValueError(f"shapes disagree: logits {logits.shape}, targets {targets.shape}, "
                     f"weights {weights.shape}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  num_classes = logits.shape[-1]
  soft_targets = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
  if label_smoothing:
    soft_targets = soft_targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  loss = -jnp.sum(soft_targets * log_probs, axis=-1)
  return jnp.sum(loss * weights), jnp.sum(weights)


def ctc_loss(ctc_logits, tokens, *, mask=None, frame_mask=None):
  """Summed CTC loss of per-frame digit logits against each line's digits.

  Args:
    ctc_logits: float [batch, frames, CTC_CLASSES]: the digits, then the blank (`tokens.py`).
    tokens: int [batch, L], full sequences `<sos> d1 .. dn <eos> <pad> ..` (`tokens.py`).
    mask: optional bool [batch]; False rows count for nothing.
    frame_mask: optional bool [batch, frames]: False on the frames of a line's width padding
      (`reader.ctc_frame_mask`), which the alignment then never reaches.

  Returns:
    (loss_sum, line_count): float32 scalars; loss_sum is the summed negative log-likelihood of
    the lines' digit strings (about the summed cross-entropy of their digits, so it adds to
    `weighted_cross_entropy`'s sum on the same scale).
  """
  if ctc_logits.shape[0] != tokens.shape[0]:
    raise ValueError(f"batch sizes disagree: ctc_logits {ctc_logits.shape}, tokens {tokens.shape}")
  labels = jnp.asarray(tokens)[:, 1:]  # Digits, then <eos> and <pad>: padding is a suffix.
  label_paddings = (labels >= tokens_lib.NUM_DIGITS).astype(jnp.float32)
  labels = jnp.where(label_paddings > 0, 0, labels)
  logit_paddings = (jnp.zeros(ctc_logits.shape[:2], jnp.float32) if frame_mask is None
                    else 1.0 - jnp.asarray(frame_mask, jnp.float32))
  per_line = optax.ctc_loss(ctc_logits.astype(jnp.float32), logit_paddings, labels,
                            label_paddings, blank_id=tokens_lib.CTC_BLANK)
  rows = (jnp.ones(per_line.shape, jnp.float32) if mask is None
          else jnp.asarray(mask, jnp.float32))
  return jnp.sum(per_line * rows), jnp.sum(rows)
