"""Greedy and beam decoding: the cache changes nothing, beam 1 is greedy, outputs obey the
token contract."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit import decode
from digit_vit.models import DigitReader, ModelConfig, tokens

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count

CFG = ModelConfig(width=32, num_heads=2, mlp_dim=64, encoder_layers=1, decoder_layers=2,
                  image_height=16, image_width=48, patch_size=(4, 4), max_length=6)


# A different model reading the same images into the same tokens: an ensemble member.
OTHER_CFG = ModelConfig(width=48, num_heads=4, mlp_dim=96, encoder_layers=2, decoder_layers=1,
                        image_height=16, image_width=48, patch_size=(8, 4), max_length=6)


@functools.lru_cache(maxsize=None)
def _params(seed, cfg=CFG):
  """Random parameters, scaled so outputs are decisive and <eos> shows up early for some rows."""
  images = jnp.zeros((1, 16, 48, 1))
  params = DigitReader(cfg).init(jax.random.key(seed), images,
                                 jnp.zeros((1, cfg.max_length), jnp.int32))["params"]
  bias = params["decoder"]["logits"]["bias"]
  params["decoder"]["logits"]["bias"] = bias.at[tokens.EOS].set(1.5)
  return jax.tree.map(lambda x: x * 2.0, params)


def _images(batch=6):
  return jax.random.uniform(jax.random.key(3), (batch, 16, 48, 1))


def _assert_contract(out):
  out = np.asarray(out)
  assert (out <= tokens.PAD).all() and (out >= 0).all()
  for row in out:
    assert tokens.SOS not in row
    eos = np.flatnonzero(row == tokens.EOS)
    if eos.size:
      assert (row[eos[0] + 1:] == tokens.PAD).all()
      assert (row[:eos[0]] < tokens.NUM_DIGITS).all()
    else:
      assert (row < tokens.NUM_DIGITS).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_equals_uncached(seed):
  params = _params(seed)
  cached, lp_cached = jax.jit(functools.partial(decode.greedy_decode, CFG))(params, _images())
  naive, lp_naive = jax.jit(functools.partial(decode.greedy_decode_uncached, CFG))(
      params, _images())
  chex.assert_shape(cached, (6, CFG.max_length))
  chex.assert_type(cached, jnp.int32)
  np.testing.assert_array_equal(cached, naive)
  np.testing.assert_allclose(lp_cached, lp_naive, rtol=1e-4, atol=1e-4)
  _assert_contract(cached)


@functools.lru_cache(maxsize=None)
def _teacher_forced_log_probs(cfg):
  """The model run teacher-forced, jitted once per config (eager dispatch of the model at every
  step took most of these tests' time): params, images, decoder inputs [batch, max_length] ->
  next-token log-probabilities [batch, max_length, vocab]."""
  return jax.jit(lambda params, images, inputs: decode.next_token_log_probs(
      DigitReader(cfg).apply({"params": params}, images, inputs)))


def _read_by_python_loop(next_token_probs, batch):
  """Greedy reading without a cache or a while loop: `next_token_probs(inputs, t)` gives the
  probabilities [batch, vocab] of the token after position t of `inputs` [batch, max_length]
  (<sos>, the tokens chosen so far, then <pad>: the decoder is causal, so what follows position
  t cannot change them; test_models.py checks that). Returns the tokens, <pad> after <eos>."""
  inputs = np.full((batch, CFG.max_length), tokens.PAD, np.int32)
  inputs[:, 0] = tokens.SOS
  chosen = np.zeros((batch, CFG.max_length), np.int32)
  for t in range(CFG.max_length):
    chosen[:, t] = np.asarray(next_token_probs(jnp.asarray(inputs), t)).argmax(-1)
    if t + 1 < CFG.max_length:
      inputs[:, t + 1] = chosen[:, t]
  for row in chosen:  # the contract: <pad> after the first <eos>
    eos = np.flatnonzero(row == tokens.EOS)
    if eos.size:
      row[eos[0] + 1:] = tokens.PAD
  return chosen


def test_greedy_matches_a_python_loop_over_teacher_forcing():
  params = _params(0)
  images = _images(3)
  forward = _teacher_forced_log_probs(CFG)
  expected = _read_by_python_loop(lambda inputs, t: forward(params, images, inputs)[:, t], 3)
  out, _ = decode.greedy_decode(CFG, params, images)
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_beam_size_one_is_greedy(seed):
  params = _params(seed)
  greedy, lp_greedy = decode.greedy_decode(CFG, params, _images())
  beam, lp_beam = decode.beam_search(CFG, params, _images(), beam_size=1, alpha=0.0)
  np.testing.assert_array_equal(beam, greedy)
  np.testing.assert_allclose(lp_beam, lp_greedy, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_output_and_its_log_prob(alpha):
  params = _params(1)
  beam, lp_beam = decode.beam_search(CFG, params, _images(), beam_size=4, alpha=alpha)
  chex.assert_shape(beam, (6, CFG.max_length))
  _assert_contract(beam)
  # The reported log-prob is the model's log-prob of the returned tokens.
  decoder_inputs = jnp.concatenate([jnp.full((6, 1), tokens.SOS), beam[:, :-1]], axis=1)
  logits = DigitReader(CFG).apply({"params": params}, _images(), decoder_inputs)
  token_lp = jnp.take_along_axis(decode.next_token_log_probs(logits), beam[..., None], -1)[..., 0]
  valid = np.cumsum(np.asarray(beam) == tokens.EOS, axis=1) - (np.asarray(beam) == tokens.EOS)
  np.testing.assert_allclose((token_lp * (valid == 0)).sum(-1), lp_beam, rtol=1e-4, atol=1e-4)


def test_max_length_is_checked():
  with pytest.raises(ValueError, match="max_length"):
    decode.greedy_decode(CFG, _params(0), _images(), max_length=CFG.max_length + 1)
  out, _ = decode.greedy_decode(CFG, _params(0), _images(), max_length=2)
  chex.assert_shape(out, (6, 2))
  # A cache of 2 steps reads the first 2 tokens the full-length one reads.
  full, _ = decode.greedy_decode(CFG, _params(0), _images())
  np.testing.assert_array_equal(out, full[:, :2])
  _, cache = decode.encode_and_init_cache(CFG, _params(0), _images(), max_length=2)
  chex.assert_shape(cache["decoder"]["block0"]["self_attention"]["cached_key"], (6, 2, 2, 16))


# ---- Test-time views


def test_view_shifts_are_distinct_and_nearest_first():
  rings = [max(abs(dy), abs(dx)) for dy, dx in decode.VIEW_SHIFTS]
  assert decode.VIEW_SHIFTS[0] == (0, 0) and len(set(decode.VIEW_SHIFTS)) == 25
  assert rings == sorted(rings) and rings.count(1) == 8 and rings.count(2) == 16


def test_shifted_views_move_the_image_with_zero_edges():
  images = _images(2)
  np.testing.assert_array_equal(decode.shifted_views(images, 1), images)
  views = decode.shifted_views(images, len(decode.VIEW_SHIFTS))
  chex.assert_shape(views, (2 * len(decode.VIEW_SHIFTS), 16, 48, 1))
  for v, (dy, dx) in enumerate(decode.VIEW_SHIFTS):
    want = np.zeros_like(np.asarray(images))
    src = np.asarray(images)
    h, w = src.shape[1:3]
    want[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
        src[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
    np.testing.assert_array_equal(views[v * 2:(v + 1) * 2], want, err_msg=f"view {v}")
  for bad in (0, len(decode.VIEW_SHIFTS) + 1):
    with pytest.raises(ValueError, match="views must be in"):
      decode.shifted_views(images, bad)


@pytest.mark.parametrize("views", [1, 5, 25])
def test_map_over_views_runs_each_view_through_fn_view_major(views):
  images = _images(3)
  # Per-image features that a shift changes: the sum of each pixel row, weighted by its row.
  fn = lambda x: jnp.sum(x, axis=2)[..., 0] * jnp.arange(1.0, x.shape[1] + 1.0)
  mapped = decode.map_over_views(fn, images, views)
  chex.assert_shape(mapped, (views * 3, 16))
  np.testing.assert_allclose(mapped, fn(decode.shifted_views(images, views)), rtol=1e-6)
  if views > 1:  # The views differ, so a mix-up of view and image order would show.
    assert not np.allclose(mapped[:3], mapped[3:6])


def _read_by_mean_probability(members, images, views):
  """Greedy reading by a python loop: every (model, view) is run teacher-forced on the chosen
  prefix, and each token is the argmax of their mean probability.

  Args:
    members: [(ModelConfig, params)].
  """
  batch = images.shape[0]
  shifted = decode.shifted_views(images, views).reshape((views, batch) + images.shape[1:])

  def mean_probs(inputs, t):
    return np.mean([np.exp(_teacher_forced_log_probs(cfg)(params, shifted[v], inputs)[:, t])
                    for cfg, params in members for v in range(views)], axis=0)

  return _read_by_python_loop(mean_probs, batch)


@pytest.mark.parametrize("views", [3, 5])
def test_greedy_over_views_picks_the_token_of_the_mean_probability(views):
  params = _params(1)
  images = _images(4)
  expected = _read_by_mean_probability([(CFG, params)], images, views)
  out, _ = jax.jit(functools.partial(decode.greedy_decode, CFG, views=views))(params, images)
  np.testing.assert_array_equal(out, expected)
  _assert_contract(out)
  beam, _ = decode.decode(CFG, params, images, beam_size=1, views=views)
  np.testing.assert_array_equal(beam, out)  # A beam of one is greedy over views too.


def test_beam_search_over_views_returns_its_log_prob_under_the_mean():
  params, images, views = _params(1), _images(), 3
  beam, lp_beam = decode.beam_search(CFG, params, images, beam_size=3, alpha=0.0, views=views)
  chex.assert_shape(beam, (6, CFG.max_length))
  _assert_contract(beam)
  decoder_inputs = jnp.concatenate([jnp.full((6, 1), tokens.SOS), beam[:, :-1]], axis=1)
  shifted = decode.shifted_views(images, views)
  logits = DigitReader(CFG).apply({"params": params}, shifted, jnp.tile(decoder_inputs, (3, 1)))
  mean_lp = decode.mean_over_views(decode.next_token_log_probs(logits).reshape(
      views * 6, -1), views).reshape(6, CFG.max_length, -1)
  token_lp = jnp.take_along_axis(mean_lp, beam[..., None], -1)[..., 0]
  valid = np.cumsum(np.asarray(beam) == tokens.EOS, axis=1) - (np.asarray(beam) == tokens.EOS)
  np.testing.assert_allclose((token_lp * (valid == 0)).sum(-1), lp_beam, rtol=1e-4, atol=1e-4)


# ---- Ensembles


def test_an_ensemble_of_a_model_with_itself_reads_as_the_model_alone():
  params, images = _params(0), _images()
  alone, lp_alone = decode.greedy_decode(CFG, params, images, views=3)
  twice, lp_twice = decode.greedy_decode((CFG, CFG), (params, params), images, views=3)
  np.testing.assert_array_equal(twice, alone)
  np.testing.assert_allclose(lp_twice, lp_alone, rtol=1e-5, atol=1e-5)
  beam_alone, _ = decode.beam_search(CFG, params, images, beam_size=3, alpha=0.0)
  beam_twice, _ = decode.beam_search([CFG, CFG], [params, params], images, beam_size=3,
                                     alpha=0.0)
  np.testing.assert_array_equal(beam_twice, beam_alone)


@pytest.mark.parametrize("views", [1, 2])
def test_ensemble_greedy_picks_the_token_of_the_mean_over_models_and_views(views):
  members = [(CFG, _params(1)), (OTHER_CFG, _params(2, OTHER_CFG))]
  images = _images(6)
  configs, params = tuple(c for c, _ in members), tuple(p for _, p in members)
  out, _ = jax.jit(functools.partial(decode.greedy_decode, configs, views=views))(params, images)
  chex.assert_shape(out, (6, CFG.max_length))
  np.testing.assert_array_equal(out, _read_by_mean_probability(members, images, views))
  _assert_contract(out)
  # The members disagree somewhere: the test could tell an ensemble from either model alone.
  first, _ = decode.greedy_decode(CFG, params[0], images, views=views)
  second, _ = decode.greedy_decode(OTHER_CFG, params[1], images, views=views)
  assert not np.array_equal(first, second)
  beam, _ = decode.decode(configs, params, images, beam_size=1, views=views)
  np.testing.assert_array_equal(beam, out)


def test_ensemble_beam_search_returns_its_log_prob_under_the_mean():
  configs, images = (CFG, OTHER_CFG), _images()
  params = (_params(1), _params(2, OTHER_CFG))
  beam, lp_beam = decode.beam_search(configs, params, images, beam_size=3, alpha=0.0, views=2)
  _assert_contract(beam)
  decoder_inputs = jnp.concatenate([jnp.full((6, 1), tokens.SOS), beam[:, :-1]], axis=1)
  shifted = decode.shifted_views(images, 2)
  per_model = [decode.next_token_log_probs(DigitReader(c).apply(
      {"params": p}, shifted, jnp.tile(decoder_inputs, (2, 1)))).reshape(12, -1)
               for c, p in zip(configs, params)]
  mean_lp = decode.mean_over_models_and_views(per_model, 2).reshape(6, CFG.max_length, -1)
  # Each of the 2 models x 2 views weighs a quarter.
  np.testing.assert_allclose(
      np.exp(mean_lp), np.mean([np.exp(lp).reshape(2, 6, CFG.max_length, -1)
                                for lp in per_model], axis=(0, 1)), rtol=1e-4, atol=1e-6)
  token_lp = jnp.take_along_axis(mean_lp, beam[..., None], -1)[..., 0]
  valid = np.cumsum(np.asarray(beam) == tokens.EOS, axis=1) - (np.asarray(beam) == tokens.EOS)
  np.testing.assert_allclose((token_lp * (valid == 0)).sum(-1), lp_beam, rtol=1e-4, atol=1e-4)


def test_an_ensemble_must_read_the_same_images_into_the_same_tokens():
  taller = ModelConfig(width=32, num_heads=2, mlp_dim=64, encoder_layers=1, decoder_layers=1,
                       image_height=32, image_width=48, patch_size=(4, 4), max_length=6)
  with pytest.raises(ValueError, match="member 1 has model.image_height=32 but member 0 has 16"):
    decode.check_ensemble([CFG, taller])
  longer = ModelConfig(width=32, num_heads=2, mlp_dim=64, encoder_layers=1, decoder_layers=1,
                       image_height=16, image_width=48, patch_size=(4, 4), max_length=9)
  with pytest.raises(ValueError, match="model.max_length=9"):
    decode.greedy_decode((CFG, longer), (_params(0), _params(0)), _images())
  with pytest.raises(ValueError, match="at least one model"):
    decode.check_ensemble([])
  with pytest.raises(ValueError, match="2 model configs needs as many param trees"):
    decode.greedy_decode((CFG, CFG), _params(0), _images())


# ---- Padded batches (width buckets) and reading past the training length


def _padded_batch(cfg, widths, seed=3):
  """Images [len(widths), H, image_width, 1], zero (background) past each one's width."""
  images = jax.random.uniform(jax.random.key(seed), (len(widths), cfg.image_height,
                                                     cfg.image_width, 1))
  columns = jnp.arange(cfg.image_width)[None, None, :, None]
  return jnp.where(columns < jnp.array(widths)[:, None, None, None], images, 0.0)


@pytest.mark.parametrize("kind", ["learned", "sinusoidal", "rope"])
def test_cached_steps_equal_teacher_forcing_past_the_training_length(kind):
  """20 cached steps of a decoder with 24 positions (lines of up to 8 digits train 9) give the
  teacher-forced log-probabilities, on a padded batch with widths. Randomized positions are on:
  they only act in training, so both sides use positions 0..t-1."""
  cfg = ModelConfig(width=32, num_heads=2, mlp_dim=64, encoder_layers=1, decoder_layers=2,
                    image_height=16, image_width=64, patch_size=(8, 8), max_length=24,
                    decoder_position=kind, random_positions=True)
  widths = jnp.array([64, 24, 41])
  images = _padded_batch(cfg, widths)
  inputs = jax.random.randint(jax.random.key(4), (3, 20), 0, 10).at[:, 0].set(tokens.SOS)
  params = DigitReader(cfg).init(jax.random.key(0), images, inputs)["params"]
  memory, cache = jax.jit(functools.partial(decode.encode_and_init_cache, cfg))(
      params, images, widths=widths)
  chex.assert_shape(cache["decoder"]["block0"]["cross_attention"]["cross_mask"], (3, 1, 1, 16))
  step = jax.jit(functools.partial(decode.decode_step, cfg))
  got = []
  for t in range(20):
    if t == 12:  # Widths passed again AND the cached mask with itself: nothing changes.
      again, _ = step(params, cache, inputs[:, t], memory, widths=widths)
    log_probs, cache = step(params, cache, inputs[:, t], memory)
    got.append(log_probs)
  got = jnp.stack(got, axis=1)
  np.testing.assert_allclose(again, got[:, 12], rtol=1e-5, atol=1e-5)
  forced = jax.jit(lambda p, x, w, i: decode.next_token_log_probs(
      DigitReader(cfg).apply({"params": p}, x, i, widths=w)))
  np.testing.assert_allclose(got, forced(params, images, widths, inputs), rtol=1e-4, atol=1e-5)
  assert np.isfinite(np.asarray(got)[..., :tokens.SOS]).all()  # <sos> and <pad> are -inf.
  # The cache kept the mask: teacher forcing that reads the padding gives other numbers.
  unmasked = forced(params, images, jnp.full((3,), 64), inputs)
  assert np.abs(np.asarray(got - unmasked)[..., :tokens.SOS]).max() > 1e-4


def test_greedy_and_beam_on_a_padded_batch_read_each_image_as_if_alone():
  params = _params(1)
  widths = jnp.array([48, 28, 13])
  images = _padded_batch(CFG, widths, seed=5)
  greedy, lp_greedy = decode.greedy_decode(CFG, params, images, widths=widths)
  beam, lp_beam = decode.decode(CFG, params, images, widths=widths, beam_size=3, alpha=0.0)
  naive, _ = decode.greedy_decode_uncached(CFG, params, images, widths=widths)
  np.testing.assert_array_equal(naive, greedy)
  for i, cut in enumerate((48, 28, 16)):  # 13 pixels hold 4 columns of 4: read 16.
    alone = images[i:i + 1, :, :cut]
    out, lp = decode.greedy_decode(CFG, params, alone)
    np.testing.assert_array_equal(greedy[i], out[0])
    np.testing.assert_allclose(lp_greedy[i], lp[0], rtol=1e-4, atol=1e-4)
    out, lp = decode.beam_search(CFG, params, alone, beam_size=3, alpha=0.0)
    np.testing.assert_array_equal(beam[i], out[0])
    np.testing.assert_allclose(lp_beam[i], lp[0], rtol=1e-4, atol=1e-4)
  # The rows' readings differ in log-prob: a mix-up of rows or widths would show.
  lp = np.asarray(lp_greedy)
  assert np.abs(lp[:, None] - lp[None, :])[~np.eye(3, dtype=bool)].min() > 1e-2


def test_shifted_views_keep_their_widths_so_any_bucket_reads_the_same():
  widths = jnp.array([40, 47, 48])
  kept = decode.shifted_widths(widths, len(decode.VIEW_SHIFTS), 48)
  chex.assert_shape(kept, (3 * len(decode.VIEW_SHIFTS),))
  np.testing.assert_array_equal(kept, np.tile([40, 47, 48], len(decode.VIEW_SHIFTS)))
  # The same lines in a bucket twice as wide read the same in every view: the masks and the
  # ink inside them do not depend on the bucket.
  images = _padded_batch(CFG, widths)
  wide = jnp.pad(images, ((0, 0), (0, 0), (0, 48), (0, 0)))
  views = len(decode.VIEW_SHIFTS)
  narrow_views = np.asarray(decode.shifted_views(images, views))
  wide_views = np.asarray(decode.shifted_views(wide, views))
  for row, wide_row, w in zip(narrow_views, wide_views, np.asarray(kept)):
    np.testing.assert_array_equal(row[:, :w], wide_row[:, :w])


def _read_by_mean_probability_with_widths(cfg, params, images, widths, views):
  """As `_read_by_mean_probability`, each view teacher-forced with its shifted widths."""
  batch, width = images.shape[0], images.shape[2]
  shifted = decode.shifted_views(images, views).reshape((views, batch) + images.shape[1:])
  view_widths = decode.shifted_widths(widths, views, width).reshape(views, batch)
  forward = jax.jit(lambda p, x, w, i: decode.next_token_log_probs(
      DigitReader(cfg).apply({"params": p}, x, i, widths=w)))

  def mean_probs(inputs, t):
    return np.mean([np.exp(forward(params, shifted[v], view_widths[v], inputs)[:, t])
                    for v in range(views)], axis=0)

  return _read_by_python_loop(mean_probs, batch)


def test_greedy_over_views_with_widths_picks_the_token_of_the_mean_probability():
  params, views = _params(1), 3
  widths = jnp.array([48, 30, 21, 46])
  images = _padded_batch(CFG, widths, seed=6)
  expected = _read_by_mean_probability_with_widths(CFG, params, images, widths, views)
  out, _ = jax.jit(functools.partial(decode.greedy_decode, CFG, views=views))(
      params, images, widths=widths)
  np.testing.assert_array_equal(out, expected)
  _assert_contract(out)
  beam, _ = decode.decode(CFG, params, images, widths=widths, beam_size=1, views=views)
  np.testing.assert_array_equal(beam, out)


# ---- Temperature (calibrated confidence)


def _tempered_written_log_probs(step_log_probs, out, temperature):
  """log_softmax(step_log_probs / T)[written token] at each step, 0 after <eos>, by numpy.

  Args:
    step_log_probs: [batch, length, vocab] the decoder's log-probs on the read prefix.
    out: int [batch, length] the tokens read.
  """
  scaled = np.asarray(step_log_probs, np.float64) / temperature
  scaled = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
  out = np.asarray(out)
  chosen = np.take_along_axis(scaled, out[..., None], -1)[..., 0]
  after_eos = np.cumsum(out == tokens.EOS, axis=1) - (out == tokens.EOS) > 0
  return np.where(after_eos, 0.0, chosen)


def _teacher_forced_on(cfg, params, images, out):
  inputs = jnp.concatenate([jnp.full((out.shape[0], 1), tokens.SOS), out[:, :-1]], axis=1)
  return decode.next_token_log_probs(DigitReader(cfg).apply({"params": params}, images, inputs))


def test_greedy_temperature_rescales_scores_but_not_the_reading_under_jit():
  params, images = _params(1), _images()
  plain, lp_plain = decode.greedy_decode(CFG, params, images)
  read = jax.jit(lambda p, x, t: decode.decode(CFG, p, x, temperature=t, token_log_probs=True))
  # T=1 (traced) gives today's log_prob, and its per-token terms add up to it.
  out, lp, per_token = read(params, images, jnp.float32(1.0))
  chex.assert_shape(per_token, (6, CFG.max_length))
  chex.assert_type(per_token, jnp.float32)
  np.testing.assert_array_equal(out, plain)
  np.testing.assert_allclose(lp, lp_plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per_token.sum(-1), lp, rtol=1e-5, atol=1e-5)
  step_lp = _teacher_forced_on(CFG, params, images, plain)
  for t in (0.5, 2.0, 3.7):
    out_t, lp_t, per_token_t = read(params, images, jnp.float32(t))
    np.testing.assert_array_equal(out_t, plain)  # Greedy's choice does not move with T.
    want = _tempered_written_log_probs(step_lp, plain, t)
    np.testing.assert_allclose(per_token_t, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lp_t, want.sum(-1), rtol=1e-4, atol=1e-4)
    assert (np.asarray(per_token_t)[want == 0] == 0).all()
  # Softer (T > 1) lowers the confidence of a confident reading, sharper raises it.
  _, lp_hot, _ = read(params, images, jnp.float32(3.7))
  _, lp_cold, _ = read(params, images, jnp.float32(0.5))
  assert (np.asarray(lp_hot) < np.asarray(lp_plain)).all()
  assert (np.asarray(lp_cold) > np.asarray(lp_plain)).all()
  # The default is the two outputs of old, bit for bit.
  assert len(decode.decode(CFG, params, images)) == 2
  np.testing.assert_array_equal(decode.decode(CFG, params, images)[1], lp_plain)


def test_beam_search_temperature_rescores_the_chosen_hypothesis():
  params, images = _params(1), _images()
  beam, lp_beam = decode.beam_search(CFG, params, images, beam_size=4, alpha=0.6)
  out, lp_one, per_token_one = decode.decode(CFG, params, images, beam_size=4,
                                             token_log_probs=True)
  np.testing.assert_array_equal(out, beam)
  np.testing.assert_array_equal(lp_one, lp_beam)
  np.testing.assert_allclose(per_token_one.sum(-1), lp_beam, rtol=1e-5, atol=1e-5)
  step_lp = _teacher_forced_on(CFG, params, images, beam)
  out_t, lp_t, per_token_t = jax.jit(lambda t: decode.decode(
      CFG, params, images, beam_size=4, temperature=t, token_log_probs=True))(jnp.float32(2.5))
  np.testing.assert_array_equal(out_t, beam)  # The search ranks at T=1 whatever T is.
  want = _tempered_written_log_probs(step_lp, beam, 2.5)
  np.testing.assert_allclose(per_token_t, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(lp_t, want.sum(-1), rtol=1e-4, atol=1e-4)


def test_temperature_over_an_ensemble_tempers_the_mean_probability():
  configs, params, images = (CFG, OTHER_CFG), (_params(1), _params(2, OTHER_CFG)), _images()
  out, _, per_token = decode.decode(configs, params, images, views=2, temperature=2.0,
                                    token_log_probs=True)
  shifted = decode.shifted_views(images, 2)
  per_model = [_teacher_forced_on(c, p, shifted, jnp.tile(out, (2, 1))).reshape(
      2 * 6 * CFG.max_length, -1) for c, p in zip(configs, params)]
  mean_lp = decode.mean_over_models_and_views(
      [lp.reshape(2, 6 * CFG.max_length, -1).reshape(2 * 6 * CFG.max_length, -1)
       for lp in per_model], 2).reshape(6, CFG.max_length, -1)
  np.testing.assert_allclose(per_token, _tempered_written_log_probs(mean_lp, out, 2.0),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_step_log_probs_let_a_temperature_be_applied_after_decoding(beam_size):
  from digit_vit import calibration  # pylint: disable=import-outside-toplevel
  params, images = _params(1), _images()
  out, lp, dists = decode.decode(CFG, params, images, beam_size=beam_size, views=2,
                                 step_log_probs=True)
  chex.assert_shape(dists, (6, CFG.max_length, CFG.vocab_size))
  written = calibration.written_mask(out)
  assert (np.asarray(dists)[~written] == 0).all()
  np.testing.assert_allclose(calibration.line_log_probs(dists, out, 1.0), lp, rtol=1e-4,
                             atol=1e-4)
  for t in (0.5, 2.0):
    out_t, lp_t, per_token_t, dists_t = decode.decode(
        CFG, params, images, beam_size=beam_size, views=2, temperature=t, token_log_probs=True,
        step_log_probs=True)
    np.testing.assert_array_equal(out_t, out)
    np.testing.assert_array_equal(dists_t, dists)  # Untempered, whatever T.
    np.testing.assert_allclose(calibration.line_log_probs(dists, out, t), lp_t, rtol=1e-4,
                               atol=1e-4)
    assert np.abs(np.asarray(lp_t) - np.asarray(lp)).max() > 1e-2
