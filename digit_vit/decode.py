"""Reading images: greedy and beam-search decoding on the key/value cache.

Each function is one `lax.while_loop` that is jit-compatible and stops as soon as every
sequence has emitted `<eos>`. The encoder runs once per image and the cross-attention keys and
values are projected once into the cache, so each step costs one single-token decoder pass.

With `views` > 1 (test-time augmentation) the encoder and the decoder run on copies of each
image shifted by one or two pixels side by side, and every token is chosen by the copies' mean
probability. An ensemble (a tuple of model configs and the tuple of their params in place of
one model) reads the same way: each model keeps its own cache, and every token is chosen by the
mean probability over the models and the views.

Outputs are raw token rows without `<sos>` (the contract's `[1, 0, 1, 11, 12, 12]` for "101"):
`<pad>` after the first `<eos>`; a row with no `<eos>` ran to `max_length` without stopping.

A model trained with a CTC head (`model.ctc_head`) can instead be read by that head alone
(`reader="ctc"`, `ctc_best_path`): one pass of the encoder, each column's most likely class,
repeats merged and blanks dropped. It writes the same token rows, so everything downstream
(metrics, calibration, predict, export) reads it as it reads the decoder. `reader="joint"`
reads both ways and keeps, line by line, the reading both models find likelier together
(`joint_decode`): the decoder's log-probability of it, teacher-forced, and the CTC head's,
summed over its alignments.

Images may be a batch padded on the right to a width bucket, with `widths` int32 [batch] the
valid width of each in pixels (see models/reader.py). The memory's mask is built once, from
the widths, by `encode_and_init_cache` and kept in each cross-attention layer's cache, so every
step (and every beam, which shares its image's cache rows) attends only to valid patches;
`decode_step` needs no widths. Test-time views shift each image inside its bucket and keep its
valid width (`shifted_widths`), so a line reads the same in any bucket that holds it.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from digit_vit.models import tokens
from digit_vit.models.reader import DigitReader, ModelConfig, ctc_frame_mask, patch_mask


def _max_length(model_config: ModelConfig, max_length: int | None) -> int:
  length = max_length or model_config.max_length
  if not 0 < length <= model_config.max_length:
    raise ValueError(f"max_length={length} must be in 1..{model_config.max_length} "
                     "(the decoder's positions)")
  return length


# Fields ensemble members must share: they read the same images into the same token positions.
_SHARED_FIELDS = ("image_height", "image_width", "image_channels", "vocab_size", "max_length")


def check_ensemble(model_configs: Sequence[ModelConfig]) -> tuple[ModelConfig, ...]:
  """The members' configs as a tuple, after checking they can read the same images together.

  Members may differ in anything else (width, depth, patches, stem, dropout).
  """
  model_configs = tuple(model_configs)
  if not model_configs:
    raise ValueError("an ensemble needs at least one model")
  first = model_configs[0]
  for i, member in enumerate(model_configs[1:], start=1):
    for field in _SHARED_FIELDS:
      if getattr(member, field) != getattr(first, field):
        raise ValueError(
            f"ensemble member {i} has model.{field}={getattr(member, field)!r} but member 0 "
            f"has {getattr(first, field)!r}: models read together must share "
            f"{', '.join(_SHARED_FIELDS)} (train them on the same canvas and max_digits)")
  return model_configs


def _members(model_config, params) -> tuple[tuple[ModelConfig, ...], tuple[Any, ...]]:
  """One model or an ensemble as (configs, params) tuples of the same length."""
  if isinstance(model_config, ModelConfig):
    return (model_config,), (params,)
  model_configs = check_ensemble(model_config)
  if not isinstance(params, (list, tuple)) or len(params) != len(model_configs):
    raise ValueError(f"an ensemble of {len(model_configs)} model configs needs as many param "
                     f"trees in a list or tuple, got {type(params).__name__}")
  return model_configs, tuple(params)


def encode_and_init_cache(model_config: ModelConfig, params, images, views: int = 1, *,
                          widths=None, max_length: int | None = None):
  """Runs the encoder (over each of the `views` of `images`, `map_over_views`) and builds the
  decode cache.

  Args:
    images: float [batch, H, W, C].
    views: test-time views (`shifted_views`).
    widths: int [batch] valid widths of the images in pixels, or None (all valid). The memory
      mask they give (`patch_mask`, for each view's `shifted_widths`) goes into the cache.
    max_length: decode steps the cache holds (default and limit: `ModelConfig.max_length`).

  Returns:
    memory [views * batch, patches, width] (view-major) and the 'cache' collection sized for
    `max_length` steps.
  """
  length = _max_length(model_config, max_length)

  def encode(x, w=None):
    return DigitReader(model_config).apply({"params": params}, x, widths=w,
                                           method=DigitReader.encode)

  memory_mask = None
  if widths is None:
    memory = map_over_views(encode, images, views)
  else:
    memory = map_over_views(encode, images, views, widths=widths)
    memory_mask = patch_mask(model_config, shifted_widths(widths, views, images.shape[2]),
                             images.shape[2])
  _, variables = DigitReader(model_config, decode=True).apply(
      {"params": params}, memory, memory_mask, length, method=DigitReader.init_cache,
      mutable=["cache"])
  return memory, variables["cache"]


def next_token_log_probs(logits):
  """Log-probabilities over the tokens a reading may emit next: digits and `<eos>`.

  `<sos>` never follows and `<pad>` only follows `<eos>`, so both are ruled out before the
  softmax; every decoded row then obeys the token contract, even from an untrained model.

  Args:
    logits: float [..., vocab].
  """
  allowed = jnp.arange(logits.shape[-1]) <= tokens.EOS
  allowed = allowed & (jnp.arange(logits.shape[-1]) != tokens.SOS)
  return jax.nn.log_softmax(jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf))


def _is_one(temperature) -> bool:
  """Whether `temperature` is statically 1: then the decoder's own log-probabilities are the
  calibrated ones and are used unchanged, so T=1 reproduces the untempered scores bit for bit
  (a traced T always takes the tempered path)."""
  return isinstance(temperature, (int, float)) and float(temperature) == 1.0


def tempered_log_probs(step_log_probs, temperature):
  """log_softmax(step_log_probs / T): the calibrated next-token distribution.

  Tokens ruled out (-inf) stay ruled out; the argmax does not move, so greedy reads the same
  tokens at every T > 0.

  Args:
    step_log_probs: float [..., vocab], the log-probabilities the decoder picks from (for
      ensembles and views, the log of the mean probability).
    temperature: a positive scalar, a Python number or a (traced) jnp value.
  """
  if _is_one(temperature):
    return step_log_probs
  return jax.nn.log_softmax(step_log_probs / jnp.asarray(temperature, jnp.float32), axis=-1)


def decode_step(model_config: ModelConfig, params, cache, token, memory, *, widths=None):
  """One cached decoder step.

  Args:
    token: int32 [batch] the previous token.
    memory: [batch, patches, width].
    widths: normally None: the cache holds the memory mask of `encode_and_init_cache`'s widths.
      Else int [batch] valid widths in pixels (of the images whose `memory` this is), whose
      mask is ANDed with the cached one.

  Returns:
    log-probabilities float32 [batch, vocab] of the next token, and the updated cache.
  """
  memory_mask = None
  if widths is not None:
    memory_mask = patch_mask(model_config, widths, _memory_width(model_config, memory))
  logits, variables = DigitReader(model_config, decode=True).apply(
      {"params": params, "cache": cache}, token[:, None], memory, memory_mask=memory_mask,
      method=DigitReader.decode_tokens, mutable=["cache"])
  return next_token_log_probs(logits[:, 0]), variables["cache"]


# Test-time views of an image: (rows, columns) pixel shifts, the unshifted image first, then the
# one-pixel ring, then the two-pixel ring. A strided conv stem sees a shift as a different
# sampling of the strokes, so the views disagree where the model is unsure.
VIEW_SHIFTS = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0), (-1, -1), (1, 1), (-1, 1), (1, -1),
               (0, -2), (0, 2), (-2, 0), (2, 0), (-1, -2), (1, 2), (-1, 2), (1, -2),
               (-2, -1), (2, 1), (-2, 1), (2, -1), (-2, -2), (2, 2), (-2, 2), (2, -2))


def check_views(views: int) -> int:
  if not 1 <= views <= len(VIEW_SHIFTS):
    raise ValueError(f"views must be in 1..{len(VIEW_SHIFTS)} (1 = the image alone), got {views}")
  return views


def _memory_width(model_config: ModelConfig, memory) -> int:
  """The image width, in pixels, whose encoding is `memory` [batch, patches (+1), width]."""
  rows = model_config.grid[0]
  patches = memory.shape[1] - int(model_config.class_token)
  return patches // rows * model_config.patch_size[1]


def shifted_widths(widths, views: int, width: int):
  """The valid widths of `shifted_views`: each view keeps its image's widths.

  A view shifted right by dx pushes the last dx pixels of the line past its width; they are the
  line's margin (`preprocess.MARGIN`, the training lines' random margins). Growing the width
  instead would make a view's mask depend on the bucket (the growth is cut at the bucket's
  edge), and so the reading on which bucket holds the line.

  Args:
    widths: int [batch] valid widths in pixels.
    width: the bucket's width (the widths are at most this).

  Returns:
    int32 [views * batch], view-major as `shifted_views`.
  """
  widths = jnp.minimum(jnp.asarray(widths, jnp.int32), width)
  return jnp.tile(widths, check_views(views))


def shifted_views(images, views: int):
  """The first `views` of VIEW_SHIFTS of every image, view-major, the edges filled with 0.

  Args:
    images: [batch, H, W, C].

  Returns:
    [views * batch, H, W, C]: rows v * batch .. (v + 1) * batch - 1 hold view v.
  """
  _, h, w, _ = images.shape
  shifts = VIEW_SHIFTS[:check_views(views)]
  p = max(max(abs(dy), abs(dx)) for dy, dx in shifts)
  padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
  return jnp.concatenate([padded[:, p - dy:p - dy + h, p - dx:p - dx + w] for dy, dx in shifts],
                         axis=0)


def map_over_views(fn, images, views: int, *, widths=None):
  """`fn` over the first `views` of VIEW_SHIFTS of `images`, one view after another.

  The same result as `fn(shifted_views(images, views))` for a per-image `fn`, but the views
  run in a `lax.map`, so only one view's activations are live at a time: the encoder over all
  25 views of a 256-line evaluation batch at once peaked at 12.8 GB of host memory (the conv
  stem's full-resolution feature maps), against 1.8 GB for one view.

  Args:
    fn: [batch, H, W, C] -> an array [batch, ...]; with `widths`, (images [batch, H, W, C],
      widths int32 [batch]) -> an array [batch, ...], called with each view's widths
      (`shifted_widths`).
    images: [batch, H, W, C].
    widths: int [batch] valid widths in pixels, or None.

  Returns:
    [views * batch, ...], view-major as `shifted_views`.
  """
  if widths is not None:
    view_widths = shifted_widths(widths, views, images.shape[2]).reshape(views, -1)
  if check_views(views) == 1:
    return fn(images) if widths is None else fn(images, view_widths[0])
  batch = images.shape[0]
  per_view = shifted_views(images, views).reshape((views, batch) + images.shape[1:])
  if widths is None:
    out = jax.lax.map(fn, per_view)
  else:
    out = jax.lax.map(lambda xs: fn(*xs), (per_view, view_widths))
  return out.reshape((views * batch,) + out.shape[2:])


def mean_over_views(log_probs, views: int):
  """log of the mean probability over the views: [views * batch, vocab] -> [batch, vocab]."""
  return mean_over_models_and_views([log_probs], views)


def mean_over_models_and_views(log_probs: Sequence[jax.Array], views: int):
  """log of the mean probability over the models and the views, each pair weighted alike.

  Args:
    log_probs: one float [views * batch, vocab] per model (view-major, as `shifted_views`).

  Returns:
    float [batch, vocab].
  """
  per_reading = jnp.concatenate(
      [lp.reshape((views, -1) + lp.shape[1:]) for lp in log_probs], axis=0)
  if per_reading.shape[0] == 1:
    return per_reading[0]
  return jax.nn.logsumexp(per_reading, axis=0) - jnp.log(float(per_reading.shape[0]))


def _encode_all(model_configs, params, images, views: int, widths, length: int):
  """Every member's memory and cache for `length` steps over the `views` of `images` (tuples,
  one per member)."""
  started = [encode_and_init_cache(c, p, images, views, widths=widths, max_length=length)
             for c, p in zip(model_configs, params)]
  return tuple(m for m, _ in started), tuple(c for _, c in started)


def _step_all(model_configs, params, caches, token, memories, views: int):
  """One cached step of every member: the log of the mean next-token probability over members
  and views [batch, vocab], and the members' updated caches."""
  stepped = [decode_step(c, p, cache, token, memory)
             for c, p, cache, memory in zip(model_configs, params, caches, memories)]
  return (mean_over_models_and_views([lp for lp, _ in stepped], views),
          tuple(cache for _, cache in stepped))


def greedy_decode(model_config: ModelConfig | Sequence[ModelConfig], params, images, *,
                  widths=None, max_length: int | None = None, views: int = 1,
                  temperature=1.0, token_log_probs: bool = False,
                  step_log_probs: bool = False):
  """Greedy reading with the cache.

  Args:
    model_config, params: one model, or an ensemble: a tuple of configs (`check_ensemble`) and
      the tuple of their params, whose mean probability picks each token.
    images: float [batch, H, W, C], W a multiple of the patch width up to image_width.
    widths: int [batch] valid width of each image in pixels (the rest is padding), or None.
    max_length: tokens written at most, <eos> included (default and limit:
      `ModelConfig.max_length`, the decoder's positions).
    views: test-time augmentation: read this many shifted copies of each image
      (`shifted_views`) and pick each token by its mean probability over them; 1 = none.
    temperature: T > 0 (a Python number or a traced scalar) that calibrates the scores
      (`tempered_log_probs`); the tokens read do not depend on it.
    token_log_probs: also return each written token's calibrated log-probability.
    step_log_probs: also return the distributions each token was picked from, so a
      temperature can be fitted (and applied) afterwards without decoding again
      (`calibration`).

  Returns:
    tokens: int32 [batch, max_length] raw outputs.
    log_prob: float32 [batch], the sum over the written tokens (up to and including `<eos>`)
      of log_softmax(step_log_probs / T)[chosen], step_log_probs the log of the mean
      probability over the models and views; exp(log_prob) is the line's confidence.
    token_log_probs (only when asked): float32 [batch, max_length], each written token's term
      of that sum, 0 after `<eos>`.
    step_log_probs (only when asked): float32 [batch, max_length, vocab], the untempered
      step_log_probs of each written token, 0 after `<eos>`.
  """
  model_configs, params = _members(model_config, params)
  length = _max_length(model_configs[0], max_length)
  batch = images.shape[0]
  memories, caches = _encode_all(model_configs, params, images, views, widths, length)

  def cond(state):
    step, *_, done = state
    return (step < length) & ~jnp.all(done)

  def body(state):
    step, token, caches, out, log_prob, per_token, dists, done = state
    step_log_probs, caches = _step_all(model_configs, params, caches, token, memories, views)
    if dists is not None:
      written = jnp.where(done[:, None], 0.0, step_log_probs)
      dists = jax.lax.dynamic_update_slice(dists, written[:, None], (0, step, 0))
    best = jnp.argmax(step_log_probs, axis=-1).astype(jnp.int32)
    best = jnp.where(done, tokens.PAD, best)
    calibrated = tempered_log_probs(step_log_probs, temperature)
    chosen = jnp.take_along_axis(calibrated, best[:, None], axis=-1)[:, 0]
    chosen = jnp.where(done, 0.0, chosen)
    log_prob = log_prob + chosen
    out = jax.lax.dynamic_update_slice(out, best[:, None], (0, step))
    if per_token is not None:
      per_token = jax.lax.dynamic_update_slice(per_token, chosen[:, None], (0, step))
    # Every view of an image is fed the token chosen for the image.
    return (step + 1, jnp.tile(best, views), caches, out, log_prob, per_token, dists,
            done | (best == tokens.EOS))

  vocab = model_configs[0].vocab_size
  state = (jnp.array(0, jnp.int32), jnp.full((views * batch,), tokens.SOS, jnp.int32), caches,
           jnp.full((batch, length), tokens.PAD, jnp.int32), jnp.zeros((batch,), jnp.float32),
           # Buffers written only when asked for: the loop is the reading's hot path.
           jnp.zeros((batch, length), jnp.float32) if token_log_probs else None,
           jnp.zeros((batch, length, vocab), jnp.float32) if step_log_probs else None,
           jnp.zeros((batch,), jnp.bool_))
  _, _, _, out, log_prob, per_token, dists, _ = jax.lax.while_loop(cond, body, state)
  return _outputs(out, log_prob, per_token, dists)


def _outputs(out, log_prob, per_token, dists):
  """(tokens, log_prob), then the optional outputs that were asked for, in signature order."""
  return (out, log_prob) + tuple(x for x in (per_token, dists) if x is not None)


def greedy_decode_uncached(model_config: ModelConfig, params, images, *, widths=None,
                           max_length: int | None = None):
  """Greedy reading that re-runs the decoder over the whole prefix at every step (no cache).

  The reference the cached decoder is tested against, and the baseline of the benchmark.
  Same outputs as `greedy_decode`.
  """
  length = _max_length(model_config, max_length)
  model = DigitReader(model_config)
  memory = model.apply({"params": params}, images, widths=widths, method=DigitReader.encode)
  memory_mask = None if widths is None else patch_mask(model_config, widths, images.shape[2])
  batch = images.shape[0]

  def cond(state):
    step, _, _, done = state
    return (step < length) & ~jnp.all(done)

  def body(state):
    step, buffer, log_prob, done = state
    logits = model.apply({"params": params}, buffer[:, :length], memory,
                         memory_mask=memory_mask, method=DigitReader.decode_tokens)
    step_log_probs = next_token_log_probs(jax.lax.dynamic_index_in_dim(logits, step, 1, False))
    best = jnp.where(done, tokens.PAD, jnp.argmax(step_log_probs, -1).astype(jnp.int32))
    chosen = jnp.take_along_axis(step_log_probs, best[:, None], axis=-1)[:, 0]
    log_prob = log_prob + jnp.where(done, 0.0, chosen)
    buffer = jax.lax.dynamic_update_slice(buffer, best[:, None], (0, step + 1))
    return step + 1, buffer, log_prob, done | (best == tokens.EOS)

  buffer = jnp.full((batch, length + 1), tokens.PAD, jnp.int32).at[:, 0].set(tokens.SOS)
  state = (jnp.array(0, jnp.int32), buffer, jnp.zeros((batch,), jnp.float32),
           jnp.zeros((batch,), jnp.bool_))
  _, buffer, log_prob, _ = jax.lax.while_loop(cond, body, state)
  return buffer[:, 1:], log_prob


def length_penalty(length, alpha: float):
  """GNMT length normalisation ((5 + length) / 6) ** alpha; alpha = 0 ranks by log-prob."""
  return ((5.0 + length) / 6.0) ** alpha


def beam_search(model_config: ModelConfig | Sequence[ModelConfig], params, images, *,
                widths=None, beam_size: int = 4, alpha: float = 0.6,
                max_length: int | None = None, views: int = 1, temperature=1.0,
                token_log_probs: bool = False, step_log_probs: bool = False):
  """Beam search with the cache.

  Keeps the `beam_size` most likely hypotheses by log-prob. A hypothesis that emitted
  `<eos>` stays in the beam with a constant log-prob (it only grows `<pad>`), so it competes
  with the unfinished ones; the loop stops once every hypothesis of every image has finished,
  since unfinished log-probs only fall. The answer is the finished hypothesis with the best
  log-prob / length_penalty(tokens, alpha) (unfinished ones only where none finished). With
  `beam_size=1` this is exactly greedy decoding. `model_config`, `params`, `widths`,
  `max_length` and `views` as in `greedy_decode`: each hypothesis is scored by the mean
  probability over the models and the views of its image.

  Temperature: the search ranks hypotheses by the model's own (T=1) log-probabilities, so the
  chosen reading does not depend on T (a tempered ranking would change which readings win,
  and calibration is meant to change only the scores). Each hypothesis also carries, per
  step, log_softmax(step_log_probs / T) of the token it wrote, gathered with it when beams are
  reordered; the chosen hypothesis's terms are its rescored log-prob. At T=1 they are the
  search's own scores.

  Returns:
    tokens: int32 [batch, max_length] the chosen hypothesis (raw outputs, as greedy).
    log_prob: float32 [batch] its (calibrated, with T != 1) log-probability up to and
      including `<eos>`.
    token_log_probs (only when asked): float32 [batch, max_length], its per-token terms, 0
      after `<eos>`.
    step_log_probs (only when asked): float32 [batch, max_length, vocab], the untempered
      distributions its tokens were picked from, 0 after `<eos>` (as greedy's).
  """
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  model_configs, params = _members(model_config, params)
  length = _max_length(model_configs[0], max_length)
  batch, k, vocab = images.shape[0], beam_size, model_configs[0].vocab_size
  if k > vocab:
    raise ValueError(f"beam_size={k} exceeds the vocabulary of {vocab} tokens")
  neg_inf = jnp.float32(-1e9)
  memories, caches = _encode_all(model_configs, params, images, views, widths, length)
  # Every beam of an image (view) shares its memory and cross-attention cache (and memory
  # mask): rows (view * batch + image) * k + beam, in every member.
  expand = functools.partial(_expand_beams, batch=views * batch, beam_size=k)
  memories, caches = jax.tree.map(expand, memories), jax.tree.map(expand, caches)
  pad_only = jnp.where(jnp.arange(vocab) == tokens.PAD, 0.0, neg_inf)

  def cond(state):
    step, _, _, _, _, finished, _, _ = state
    return (step < length) & ~jnp.all(finished)

  def body(state):
    step, seq, per_token, dists, log_prob, finished, last, caches = state
    step_log_probs, caches = _step_all(model_configs, params, caches,
                                       jnp.tile(last.reshape(-1), views), memories, views)
    step_log_probs = step_log_probs.reshape(batch, k, vocab)
    if dists is not None:  # Each candidate's distribution is its source beam's.
      written = jnp.where(finished[:, :, None], 0.0, step_log_probs)
      dists = jax.lax.dynamic_update_slice(dists, written[:, :, None], (0, 0, step, 0))
    # Finished hypotheses add 0 (a <pad>) in both the search and the calibrated scores.
    calibrated = jnp.where(finished[:, :, None], pad_only,
                           tempered_log_probs(step_log_probs, temperature))
    step_log_probs = jnp.where(finished[:, :, None], pad_only, step_log_probs)
    candidates = (log_prob[:, :, None] + step_log_probs).reshape(batch, k * vocab)
    log_prob, top = jax.lax.top_k(candidates, k)
    source, token = top // vocab, (top % vocab).astype(jnp.int32)
    written = jnp.take_along_axis(calibrated.reshape(batch, k * vocab), top, axis=1)
    seq = jnp.take_along_axis(seq, source[:, :, None], axis=1)
    seq = jax.lax.dynamic_update_slice(seq, token[:, :, None], (0, 0, step))
    per_token = jnp.take_along_axis(per_token, source[:, :, None], axis=1)
    per_token = jax.lax.dynamic_update_slice(per_token, written[:, :, None], (0, 0, step))
    if dists is not None:
      dists = jnp.take_along_axis(dists, source[:, :, None, None], axis=1)
    finished = jnp.take_along_axis(finished, source, axis=1) | (token == tokens.EOS)
    flat_source = (jnp.arange(batch)[:, None] * k + source).reshape(-1)
    # The same reordering in every view of every member.
    flat_source = (jnp.arange(views)[:, None] * (batch * k) + flat_source).reshape(-1)
    caches = jax.tree.map(lambda x: _gather_beams(x, flat_source, views * batch * k), caches)
    return step + 1, seq, per_token, dists, log_prob, finished, token, caches

  # All beams start as copies of one <sos>; -inf on the copies keeps them from duplicating.
  state = (jnp.array(0, jnp.int32), jnp.full((batch, k, length), tokens.PAD, jnp.int32),
           jnp.zeros((batch, k, length), jnp.float32),
           jnp.zeros((batch, k, length, vocab), jnp.float32) if step_log_probs else None,
           jnp.full((batch, k), neg_inf).at[:, 0].set(0.0), jnp.zeros((batch, k), jnp.bool_),
           jnp.full((batch, k), tokens.SOS, jnp.int32), caches)
  _, seq, per_token, dists, log_prob, finished, _, _ = jax.lax.while_loop(cond, body, state)
  num_tokens = jnp.where(finished, jnp.argmax(seq == tokens.EOS, axis=-1) + 1, length)
  score = log_prob / length_penalty(num_tokens.astype(jnp.float32), alpha)
  best = jnp.argmax(jnp.where(finished, score, score + neg_inf), axis=1)
  out = jnp.take_along_axis(seq, best[:, None, None], axis=1)[:, 0]
  per_token = jnp.take_along_axis(per_token, best[:, None, None], axis=1)[:, 0]
  if dists is not None:
    dists = jnp.take_along_axis(dists, best[:, None, None, None], axis=1)[:, 0]
  if _is_one(temperature):
    # The search's own sum: today's log_prob exactly.
    log_prob = jnp.take_along_axis(log_prob, best[:, None], axis=1)[:, 0]
  else:
    log_prob = per_token.sum(axis=-1)
  return _outputs(out, log_prob, per_token if token_log_probs else None, dists)


def _expand_beams(x, *, batch, beam_size):
  """[batch, ...] -> [batch * beam_size, ...], each row repeated; scalars unchanged."""
  if x.ndim == 0 or x.shape[0] != batch:
    return x
  return jnp.repeat(x, beam_size, axis=0)


def _gather_beams(x, flat_source, rows):
  """Reorders the per-beam rows of a cache leaf; scalars (cache indices) unchanged."""
  if x.ndim == 0 or x.shape[0] != rows:
    return x
  return x[flat_source]


READERS = ("decoder", "ctc", "joint")
# `joint`'s default weight of the CTC log-likelihood against the decoder's
# (`config.decode.ctc_weight`).
JOINT_CTC_WEIGHT = 0.5

# The score of a token a CTC column cannot write (<sos>, <pad>): finite, so a distribution of
# `ctc_best_path` times a zero weight stays 0, and far below any class's log-probability.
_NO_CTC_CLASS = -1e4
# The CTC log-likelihood of a reading the columns cannot align (too many digits for them, or
# a non-digit before its <eos>): finite, so a weighted sum with it still compares.
_UNALIGNABLE = -1e9


def ctc_columns(model_config: ModelConfig | Sequence[ModelConfig], params, images, *,
                widths=None, views: int = 1):
  """The CTC head's columns of each image, as every CTC reading takes them.

  Returns:
    (column_log_probs float32 [batch, columns, 11]: the log of the mean probability over the
    models and views of the digits and the blank; valid bool [batch, columns], or None when
    `widths` is None: the columns that hold the image).

  Raises:
    ValueError: a member without a CTC head, or members of different patch widths (their
      columns would not line up).
  """
  model_configs, params = _members(model_config, params)
  first = model_configs[0]
  for i, c in enumerate(model_configs):
    if not c.ctc_head:
      raise ValueError(f"reading the CTC head's columns needs one, but model {i} has none: "
                       "train it with model.ctc_head=True and loss.ctc_weight > 0")
    if c.patch_size[1] != first.patch_size[1]:
      raise ValueError("the CTC readings average the members' columns: every model needs "
                       f"the patch width {first.patch_size[1]}, model {i} has {c.patch_size[1]}")

  def columns(config, p):
    def read(x, w=None):
      return DigitReader(config).apply({"params": p}, x, widths=w,
                                       method=DigitReader.column_logits)
    return jax.nn.log_softmax(map_over_views(read, images, views, widths=widths), axis=-1)

  column_log_probs = mean_over_models_and_views(
      [columns(c, p) for c, p in zip(model_configs, params)], views)
  valid = None if widths is None else ctc_frame_mask(first, widths, images.shape[2])
  return column_log_probs, valid


def ctc_best_path(model_config: ModelConfig | Sequence[ModelConfig], params, images, *,
                  widths=None, max_length: int | None = None, views: int = 1,
                  temperature=1.0, token_log_probs: bool = False,
                  step_log_probs: bool = False):
  """Reads each line from the CTC head's columns: the most likely class of each column, runs
  of one class merged, blanks dropped (best-path decoding). Nothing in it depends on a position
  or a length, so it reads lines of any length the encoder's columns hold.

  Its token rows and scores are `greedy_decode`'s: the digits, `<eos>`, then `<pad>`; a line
  whose digits do not fit `max_length` tokens is cut there without `<eos>`. Each written token
  is scored by one column's distribution, mapped onto the vocabulary (digits to digits, the
  blank to `<eos>`): a digit by the column where its run starts, `<eos>` by the first blank
  column after the last digit (the last valid column where the line ends on a digit, so a
  line cut at its last stroke reads as less certain). The line's confidence is the product of
  those tokens' tempered probabilities, so `calibration` fits it as it fits the decoder's.

  Args, returns: as `greedy_decode` (every member of an ensemble needs a CTC head; the
  columns' probabilities are averaged over models and views, so members share the patch
  width, `ctc_columns`). The columns past each image's valid width write nothing.
  """
  model_configs, params = _members(model_config, params)
  length = _max_length(model_configs[0], max_length)
  column_log_probs, valid = ctc_columns(model_configs, params, images, widths=widths,
                                        views=views)
  return best_path(column_log_probs, valid, length=length,
                   vocab_size=model_configs[0].vocab_size, temperature=temperature,
                   token_log_probs=token_log_probs, step_log_probs=step_log_probs)


def best_path(column_log_probs, valid=None, *, length: int, vocab_size: int = tokens.VOCAB_SIZE,
              temperature=1.0, token_log_probs: bool = False, step_log_probs: bool = False):
  """`ctc_best_path`'s reading of given columns.

  Args:
    column_log_probs: float32 [batch, columns, 11], each column's log-probabilities over the
      digits and the blank (`tokens.CTC_BLANK`).
    valid: bool [batch, columns], the columns that hold the image (None: all).
    length: tokens written at most, <eos> included.

  Returns:
    as `greedy_decode`.
  """
  batch, frames, _ = column_log_probs.shape
  if valid is None:
    valid = jnp.ones((batch, frames), jnp.bool_)
  best = jnp.where(valid, jnp.argmax(column_log_probs, axis=-1), tokens.CTC_BLANK)
  previous = jnp.pad(best, ((0, 0), (1, 0)), constant_values=tokens.CTC_BLANK)[:, :-1]
  emits = (best != tokens.CTC_BLANK) & (best != previous)
  count = jnp.sum(emits, axis=1)
  t = jnp.arange(frames, dtype=jnp.int32)
  rows = jnp.arange(batch)[:, None]
  # Each emitting column writes token cumsum - 1; the others (and digits past max_length) are
  # sent to index `length`, which the scatter drops.
  slot = jnp.where(emits, jnp.cumsum(emits, axis=1) - 1, length)
  out = jnp.full((batch, length), tokens.PAD, jnp.int32).at[rows, slot].set(
      best.astype(jnp.int32), mode="drop")
  source = jnp.zeros((batch, length), jnp.int32).at[rows, slot].set(
      jnp.broadcast_to(t, (batch, frames)), mode="drop")
  last_digit = jnp.max(jnp.where(emits, t, -1), axis=1)
  after = valid & (best == tokens.CTC_BLANK) & (t > last_digit[:, None])
  last_valid = jnp.sum(valid, axis=1) - 1
  end_column = jnp.where(jnp.any(after, axis=1), jnp.argmax(after, axis=1), last_valid)
  out = out.at[rows[:, 0], count].set(tokens.EOS, mode="drop")
  source = source.at[rows[:, 0], count].set(end_column.astype(jnp.int32), mode="drop")

  picked = jnp.take_along_axis(column_log_probs, source[:, :, None], axis=1)  # [b, L, 11]
  dists = jnp.full((batch, length, vocab_size), _NO_CTC_CLASS, jnp.float32)
  dists = dists.at[..., :tokens.NUM_DIGITS].set(picked[..., :tokens.NUM_DIGITS])
  dists = dists.at[..., tokens.EOS].set(picked[..., tokens.CTC_BLANK])
  return _scored_outputs(out, dists, temperature, token_log_probs, step_log_probs)


def written_tokens(outputs):
  """bool [batch, L]: the tokens a reading wrote, its first `<eos>` included (every token of a
  row without one)."""
  is_eos = outputs == tokens.EOS
  first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), outputs.shape[1])
  return jnp.arange(outputs.shape[1])[None, :] <= first_eos[:, None]


def _scored_outputs(out, dists, temperature, token_log_probs: bool, step_log_probs: bool):
  """`greedy_decode`'s outputs for token rows `out` [b, L] picked from the untempered
  distributions `dists` [b, L, vocab]: each written token's tempered log-prob and their sum;
  `dists` zeroed after `<eos>`."""
  written = written_tokens(out)
  dists = jnp.where(written[..., None], dists, 0.0)
  calibrated = tempered_log_probs(dists, temperature)
  per_token = jnp.where(
      written, jnp.take_along_axis(calibrated, out[..., None], axis=-1)[..., 0], 0.0)
  return _outputs(out, jnp.sum(per_token, axis=1), per_token if token_log_probs else None,
                  dists if step_log_probs else None)


def ctc_log_likelihood(column_log_probs, valid, outputs):
  """log p(digits | columns) under CTC, the sum over every alignment: float32 [batch].

  Args:
    column_log_probs: float32 [batch, columns, 11] (`ctc_columns`).
    valid: bool [batch, columns] or None (all valid).
    outputs: int [batch, L] token rows (the digits, `<eos>`, `<pad>`); a row without `<eos>`
      is all digits.

  A row with a non-digit before its `<eos>`, or more digits than its columns can align, scores
  `_UNALIGNABLE`.
  """
  written = written_tokens(outputs) & (outputs != tokens.EOS)
  digits = written & (outputs < tokens.NUM_DIGITS)
  well_formed = jnp.all(digits == written, axis=1)
  logit_paddings = (jnp.zeros(column_log_probs.shape[:2], jnp.float32) if valid is None
                    else 1.0 - valid.astype(jnp.float32))
  loss = optax.ctc_loss(column_log_probs, logit_paddings, jnp.where(digits, outputs, 0),
                        1.0 - digits.astype(jnp.float32), blank_id=tokens.CTC_BLANK)
  # A digit repeated next to itself needs a blank column between the two. optax scores a row
  # with too few columns by a large finite number, not infinity: say so instead.
  repeats = jnp.sum(digits[:, 1:] & (outputs[:, 1:] == outputs[:, :-1]), axis=1)
  columns = jnp.sum(1.0 - logit_paddings, axis=1)
  aligned = well_formed & (jnp.sum(digits, axis=1) + repeats <= columns)
  return jnp.where(aligned, -loss, _UNALIGNABLE)


def teacher_forced_log_probs(model_config: ModelConfig | Sequence[ModelConfig], params, images,
                             outputs, *, widths=None, views: int = 1):
  """The decoder's distributions over each token of given readings, each from the tokens
  before it (`next_token_log_probs`, as decoding picks them): the log of the mean probability
  over the models and views, float32 [batch, L, vocab] for `outputs` int [batch, L] (token
  rows without `<sos>`). For a reading `greedy_decode` wrote they equal its `step_log_probs`
  (up to `<eos>`)."""
  model_configs, params = _members(model_config, params)
  inputs = jnp.concatenate(
      [jnp.full((outputs.shape[0], 1), tokens.SOS, jnp.int32), outputs[:, :-1]], axis=1)

  def member(config, p):
    def read(x, w=None):  # One view of every image: the same inputs.
      return next_token_log_probs(DigitReader(config).apply({"params": p}, x, inputs, widths=w))
    return map_over_views(read, images, views, widths=widths)

  return mean_over_models_and_views([member(c, p) for c, p in zip(model_configs, params)],
                                    views)


def joint_decode(model_config: ModelConfig | Sequence[ModelConfig], params, images, *,
                 widths=None, max_length: int | None = None, views: int = 1,
                 temperature=1.0, ctc_weight: float = JOINT_CTC_WEIGHT, beam_size: int = 1,
                 alpha: float = 0.6, token_log_probs: bool = False,
                 step_log_probs: bool = False):
  """Reads each line twice, with the decoder (greedily, or its beam search's answer for
  beam_size > 1, `beam_search` with `alpha`) and by the CTC head's best path, and
  keeps the reading with the higher joint log-likelihood
  (1 - ctc_weight) * log p_decoder + ctc_weight * log p_ctc, each reading scored by both (the
  decoder teacher-forced on it, `teacher_forced_log_probs`; CTC summed over its alignments,
  `ctc_log_likelihood`), as joint CTC-attention decoding rescores (Watanabe et al. 2017).
  Where the two readings agree it is that reading.

  The decoder's distributions are the chosen reading's scores (`step_log_probs`), so its
  confidence is the decoder's probability of the line, calibrated as the decoder's. It costs
  the decoder's reading, one more encoder pass for the columns and one teacher-forced pass.

  Args, returns: as `greedy_decode`; ctc_weight in [0, 1] (0: the decoder's log-likelihood
  alone decides, 1: the CTC one's). Every member needs a CTC head (`ctc_columns`).
  """
  if not 0.0 <= ctc_weight <= 1.0:
    raise ValueError(f"decode.ctc_weight={ctc_weight} must be in [0, 1]")
  model_configs, params = _members(model_config, params)
  length = _max_length(model_configs[0], max_length)
  column_log_probs, valid = ctc_columns(model_configs, params, images, widths=widths,
                                        views=views)
  by_ctc, *_ = best_path(column_log_probs, valid, length=length,
                         vocab_size=model_configs[0].vocab_size)
  # At temperature 1 the decoder's log_prob of its own reading is its log-likelihood.
  if beam_size == 1:
    by_decoder, decoder_log_prob, decoder_dists = greedy_decode(
        model_configs, params, images, widths=widths, max_length=length, views=views,
        step_log_probs=True)
  else:
    by_decoder, decoder_log_prob, decoder_dists = beam_search(
        model_configs, params, images, widths=widths, beam_size=beam_size, alpha=alpha,
        max_length=length, views=views, step_log_probs=True)
  ctc_dists = teacher_forced_log_probs(model_configs, params, images, by_ctc, widths=widths,
                                       views=views)
  _, ctc_reading_log_prob = _scored_outputs(by_ctc, ctc_dists, 1.0, False, False)

  def joint_score(outputs, decoder_log_likelihood):
    return ((1.0 - ctc_weight) * decoder_log_likelihood
            + ctc_weight * ctc_log_likelihood(column_log_probs, valid, outputs))

  take_ctc = (joint_score(by_ctc, ctc_reading_log_prob)
              > joint_score(by_decoder, decoder_log_prob))
  out = jnp.where(take_ctc[:, None], by_ctc, by_decoder)
  dists = jnp.where(take_ctc[:, None, None], ctc_dists, decoder_dists)
  return _scored_outputs(out, dists, temperature, token_log_probs, step_log_probs)


def decode(model_config: ModelConfig | Sequence[ModelConfig], params, images, *,
           widths=None, beam_size: int = 1, alpha: float = 0.6, max_length: int | None = None,
           views: int = 1, temperature=1.0, token_log_probs: bool = False,
           step_log_probs: bool = False, reader: str = "decoder",
           ctc_weight: float = JOINT_CTC_WEIGHT):
  """Greedy for beam_size 1, else beam search; over `views` shifted copies of each image and,
  for an ensemble (tuples of configs and params), over its models; `widths` int [batch] the
  images' valid widths in pixels (None: all valid). `reader="ctc"` reads the CTC head's
  columns instead of the decoder (`ctc_best_path`, beam_size 1 only), `reader="joint"` both,
  keeping the reading of the higher joint score (`joint_decode`, weighted by `ctc_weight`;
  with beam_size > 1 the decoder's reading is its beam search's).

  `temperature` T > 0 (Python number or traced scalar) calibrates the scores only: log_prob
  [batch] is the sum over the written tokens, `<eos>` included, of
  log_softmax(step_log_probs / T)[chosen], and exp(log_prob) is the line's confidence (the
  run's T: `calibration.load_temperature`).

  Returns (tokens int32 [batch, max_length], log_prob float32 [batch]), and with
  `token_log_probs=True` a third output, float32 [batch, max_length]: each written token's
  calibrated log-prob, 0 after `<eos>`; with `step_log_probs=True` after those, float32
  [batch, max_length, vocab]: the untempered distributions the tokens were picked from, 0
  after `<eos>` (for fitting a temperature without decoding again, `calibration`).
  """
  if reader not in READERS:
    raise ValueError(f"decode.reader must be one of {READERS}, got {reader!r}")
  if reader == "joint":
    return joint_decode(model_config, params, images, widths=widths, max_length=max_length,
                        views=views, temperature=temperature, ctc_weight=ctc_weight,
                        beam_size=beam_size, alpha=alpha, token_log_probs=token_log_probs,
                        step_log_probs=step_log_probs)
  if reader == "ctc":
    if beam_size != 1:
      raise ValueError(f"decode.reader='ctc' reads the best path; set decode.beam_size=1 "
                       f"(got {beam_size})")
    return ctc_best_path(model_config, params, images, widths=widths, max_length=max_length,
                         views=views, temperature=temperature, token_log_probs=token_log_probs,
                         step_log_probs=step_log_probs)
  if beam_size == 1:
    return greedy_decode(model_config, params, images, widths=widths, max_length=max_length,
                         views=views, temperature=temperature, token_log_probs=token_log_probs,
                         step_log_probs=step_log_probs)
  return beam_search(model_config, params, images, widths=widths, beam_size=beam_size,
                     alpha=alpha, max_length=max_length, views=views, temperature=temperature,
                     token_log_probs=token_log_probs, step_log_probs=step_log_probs)
