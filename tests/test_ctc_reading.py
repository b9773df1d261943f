"""Reading a line with the CTC head's columns (`decode.reader='ctc'`): best path, the token
contract, scores the calibration can temper, masks, and the errors that say what to change;
and with both the decoder and the columns (`decode.reader='joint'`): the CTC likelihood summed
over alignments, teacher forcing, and the rescoring that picks between the two readings."""

import dataclasses
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit import calibration, config_lib, decode, trained
from digit_vit.models import DigitReader, ModelConfig, tokens

B = tokens.CTC_BLANK
CFG = ModelConfig(width=32, num_heads=2, mlp_dim=64, encoder_layers=1, decoder_layers=1,
                  image_height=16, image_width=48, patch_size=(16, 4), max_length=8,
                  ctc_head=True)


def _columns(best, rng, sharp=4.0):
  """log-probs [batch, T, 11] whose argmax in each column is `best` (random elsewhere)."""
  best = np.asarray(best)
  logits = rng.normal(size=best.shape + (tokens.CTC_CLASSES,))
  np.put_along_axis(logits, best[..., None], sharp, axis=-1)
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def test_best_path_merges_runs_drops_blanks_and_ends_after_the_last_digit():
  rng = np.random.default_rng(0)
  best = [[B, 3, 3, B, 3, 1, B, B],   # "331": a blank between the 3s keeps both.
          [7, 7, B, 2, 2, 5, 5, 5]]   # valid up to column 5: "72", the 5s are padding.
  columns = _columns(best, rng)
  valid = jnp.array([[True] * 8, [True] * 5 + [False] * 3])
  out, log_prob, per_token, dists = decode.best_path(
      columns, valid, length=6, token_log_probs=True, step_log_probs=True)
  chex.assert_shape(out, (2, 6))
  chex.assert_shape(dists, (2, 6, tokens.VOCAB_SIZE))
  E, P = tokens.EOS, tokens.PAD
  np.testing.assert_array_equal(out, [[3, 3, 1, E, P, P], [7, 2, E, P, P, P]])
  c = np.asarray(columns)
  # Each digit is scored by the column its run starts in; <eos> by the first blank after the
  # last digit (row 0: column 6), or the last valid column where none is (row 1: column 4).
  for row, token_columns in ((0, [1, 4, 5, 6]), (1, [0, 3, 4])):
    for i, col in enumerate(token_columns):
      np.testing.assert_allclose(dists[row, i, :tokens.NUM_DIGITS], c[row, col, :B])
      np.testing.assert_allclose(dists[row, i, E], c[row, col, B])
      chosen = B if out[row, i] == E else out[row, i]
      np.testing.assert_allclose(per_token[row, i], c[row, col, chosen], rtol=1e-6)
  written = calibration.written_mask(out)
  assert (np.asarray(dists)[~written] == 0).all() and (np.asarray(per_token)[~written] == 0).all()
  np.testing.assert_allclose(log_prob, np.asarray(per_token).sum(axis=1), rtol=1e-6)
  np.testing.assert_allclose(calibration.line_log_probs(dists, out, 1.0), log_prob, rtol=1e-5)


def test_best_path_cuts_a_long_line_without_eos_and_reads_empty_lines():
  rng = np.random.default_rng(1)
  columns = _columns([[1, B, 2, B, 3, B], [B] * 6], rng)
  out, _ = decode.best_path(columns, length=2)
  np.testing.assert_array_equal(out, [[1, 2], [tokens.EOS, tokens.PAD]])


def test_best_path_temperature_rescales_scores_not_the_reading():
  columns = _columns([[B, 4, 4, B, 9, B]], np.random.default_rng(2), sharp=2.0)
  out, lp, dists = decode.best_path(columns, length=5, step_log_probs=True)
  for t in (0.5, 2.0):
    out_t, lp_t = decode.best_path(columns, length=5, temperature=t)
    np.testing.assert_array_equal(out_t, out)
    np.testing.assert_allclose(lp_t, calibration.line_log_probs(dists, out, t), rtol=1e-5)
    assert abs(float(lp_t[0] - lp[0])) > 1e-2


@functools.lru_cache(maxsize=None)
def _params(cfg=CFG):
  params = DigitReader(cfg).init(jax.random.key(0), jnp.zeros((1, 16, 48, 1)),
                                 jnp.zeros((1, cfg.max_length), jnp.int32))["params"]
  # A blank-heavy head, so that the random model's lines end and some columns write digits.
  head = params["ctc_head"]["logits"]
  head["bias"] = head["bias"].at[B].set(1.0)
  return jax.tree.map(lambda x: x * 3.0, params)


def test_the_model_reads_its_columns_and_padding_changes_nothing():
  params = _params()
  images = jax.random.uniform(jax.random.key(4), (3, 16, 48, 1))
  widths = jnp.array([48, 28, 13])
  columns = jnp.arange(48)[None, None, :, None]
  images = jnp.where(columns < widths[:, None, None, None], images, 0.0)
  out, lp = jax.jit(functools.partial(decode.decode, CFG, reader="ctc"))(
      params, images, widths=widths)
  logits = DigitReader(CFG).apply({"params": params}, images, widths=widths,
                                  method=DigitReader.column_logits)
  chex.assert_shape(logits, (3, 12, tokens.CTC_CLASSES))
  from digit_vit.models.reader import ctc_frame_mask  # pylint: disable=import-outside-toplevel
  want, want_lp = decode.best_path(jax.nn.log_softmax(logits), ctc_frame_mask(CFG, widths, 48),
                                   length=CFG.max_length)
  np.testing.assert_array_equal(out, want)
  np.testing.assert_allclose(lp, want_lp, rtol=1e-5)
  assert (np.asarray(out) < tokens.NUM_DIGITS).sum() > 0  # Some digits are read.
  for i, cut in enumerate((48, 28, 16)):  # 13 pixels hold 4 columns of 4: read 16.
    alone, alone_lp = decode.decode(CFG, params, images[i:i + 1, :, :cut], reader="ctc")
    np.testing.assert_array_equal(out[i], alone[0])
    np.testing.assert_allclose(lp[i], alone_lp[0], rtol=1e-4, atol=1e-4)
  # An ensemble of the model with itself, over views, reads by the mean of its columns.
  same, _ = decode.decode((CFG, CFG), (params, params), images, widths=widths, reader="ctc")
  np.testing.assert_array_equal(same, out)
  out_v, _ = decode.decode(CFG, params, images, widths=widths, views=3, reader="ctc")
  chex.assert_shape(out_v, (3, CFG.max_length))


def test_ctc_reading_says_what_to_change():
  images = jnp.zeros((1, 16, 48, 1))
  with pytest.raises(ValueError, match="model.ctc_head=True"):
    decode.decode(dataclasses.replace(CFG, ctc_head=False), _params(), images, reader="ctc")
  with pytest.raises(ValueError, match="beam_size=1"):
    decode.decode(CFG, _params(), images, reader="ctc", beam_size=3)
  with pytest.raises(ValueError, match="model 1 has none"):
    decode.decode((CFG, dataclasses.replace(CFG, ctc_head=False)), (_params(), _params()),
                  images, reader="joint")
  with pytest.raises(ValueError, match=r"ctc_weight=1.5 must be in \[0, 1\]"):
    decode.decode(CFG, _params(), images, reader="joint", ctc_weight=1.5)
  with pytest.raises(ValueError, match="decode.reader must be one of"):
    decode.decode(CFG, _params(), images, reader="columns")
  config = config_lib.load("tiny")
  config.decode.reader = "ctc"
  with pytest.raises(ValueError, match="ctc_head=True"):
    trained.read_with(config)
  config.model.ctc_head = True
  assert trained.read_with(config) == "ctc"
  config.decode.reader = "joint"
  assert trained.reader_options(config) == {"reader": "joint", "ctc_weight": 0.5}
  assert trained.decoding(config, beam_size=4).beam_size == 4  # The decoder's hypothesis.
  config.decode.ctc_weight = -0.1
  with pytest.raises(ValueError, match=r"config.decode.ctc_weight=-0.1 must be in \[0, 1\]"):
    trained.reader_options(config)
  config.decode.ctc_weight = 0.5
  config.decode.reader = "ctc"
  with pytest.raises(ValueError, match="beam_size=4 does not apply"):
    trained.decoding(config, beam_size=4)  # predict's, evaluate's, export's --beam_size.
  config.decode.beam_size = 2  # The config's own beam, as config_checks reads it.
  with pytest.raises(ValueError, match="beam_size=2 does not apply"):
    trained.decoding(config)
  config.decode.reader = "columns"
  with pytest.raises(ValueError, match="must be one of"):
    trained.read_with(config)


def _brute_force_ctc(column_log_probs, digits: str) -> float:
  """log of the summed probability of every path over the columns that collapses to `digits`."""
  probs = np.exp(np.asarray(column_log_probs, np.float64))
  total = 0.0
  for path in itertools.product(range(tokens.CTC_CLASSES), repeat=probs.shape[0]):
    merged = [c for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
    if "".join(str(c) for c in merged if c != B) == digits:
      total += np.prod(probs[np.arange(len(path)), path])
  return float(np.log(total)) if total else -np.inf


def test_ctc_log_likelihood_sums_every_alignment_and_flags_what_cannot_align():
  E, P = tokens.EOS, tokens.PAD
  rng = np.random.default_rng(5)
  columns = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(1, 4, 11)), jnp.float32) * 2)
  columns = jnp.tile(columns, (6, 1, 1))
  valid = jnp.array([[True] * 4] * 5 + [[True, True, True, False]])
  rows = jnp.array([[3, 1, E, P, P],   # "31"
                    [2, 2, E, P, P],   # "22": needs a blank between: 3 of the 4 columns.
                    [E, P, P, P, P],   # "": every column blank.
                    [7, 7, 7, E, P],   # "777" needs 5 columns: cannot align.
                    [4, P, 5, E, P],   # a non-digit before <eos>: ill-formed.
                    [2, 2, E, P, P]])  # "22" in the 3 valid columns of the last row.
  got = np.asarray(decode.ctc_log_likelihood(columns, valid, rows))
  for i, digits in ((0, "31"), (1, "22"), (2, "")):
    np.testing.assert_allclose(got[i], _brute_force_ctc(columns[i], digits), rtol=1e-4)
  np.testing.assert_allclose(got[5], _brute_force_ctc(columns[5, :3], "22"), rtol=1e-4)
  np.testing.assert_array_equal(got[3:5], [decode._UNALIGNABLE] * 2)  # pylint: disable=protected-access
  # A row without <eos> (a reading cut at max_length) is all digits.
  cut = decode.ctc_log_likelihood(columns[:1], None, jnp.array([[3, 1]]))
  np.testing.assert_allclose(cut, got[:1], rtol=1e-6)


def _lines(widths=(48, 28, 13), seed=4):
  """Random images [3, 16, 48, 1] blank past each of `widths`, and the widths."""
  widths = jnp.array(widths)
  images = jax.random.uniform(jax.random.key(seed), (len(widths), 16, 48, 1))
  return jnp.where(jnp.arange(48)[None, None, :, None] < widths[:, None, None, None],
                   images, 0.0), widths


def test_teacher_forcing_gives_the_greedy_readings_own_distributions():
  params = _params()
  images, widths = _lines()
  other = jax.tree.map(lambda x: x * 0.9, params)
  for configs, ps, views in ((CFG, params, 1), ((CFG, CFG), (params, other), 2)):
    out, _, dists = decode.greedy_decode(configs, ps, images, widths=widths, views=views,
                                         step_log_probs=True)
    forced = decode.teacher_forced_log_probs(configs, ps, images, out, widths=widths,
                                             views=views)
    chex.assert_shape(forced, (3, CFG.max_length, tokens.VOCAB_SIZE))
    written = np.asarray(decode.written_tokens(out))
    np.testing.assert_allclose(np.asarray(forced)[written], np.asarray(dists)[written],
                               rtol=1e-4, atol=1e-4)


def test_joint_reading_keeps_the_reading_of_the_higher_joint_score():
  params = _params()
  images, widths = _lines()
  cols, valid = decode.ctc_columns(CFG, params, images, widths=widths)
  by_ctc, _ = decode.decode(CFG, params, images, widths=widths, reader="ctc")
  by_decoder, _ = decode.decode(CFG, params, images, widths=widths)

  def joint_score(out, weight):
    dists = decode.teacher_forced_log_probs(CFG, params, images, out, widths=widths)
    written = np.asarray(decode.written_tokens(out))
    chosen = np.take_along_axis(np.asarray(dists), np.asarray(out)[..., None], -1)[..., 0]
    return ((1 - weight) * np.where(written, chosen, 0).sum(1)
            + weight * np.asarray(decode.ctc_log_likelihood(cols, valid, out)))

  picked_both = set()
  for weight in (0.0, 0.5, 1.0):
    out, lp, per_token, dists = jax.jit(functools.partial(
        decode.decode, CFG, reader="joint", ctc_weight=weight, temperature=1.5,
        token_log_probs=True, step_log_probs=True))(params, images, widths=widths)
    chex.assert_shape(out, (3, CFG.max_length))
    take_ctc = joint_score(by_ctc, weight) > joint_score(by_decoder, weight)
    np.testing.assert_array_equal(out, np.where(take_ctc[:, None], by_ctc, by_decoder))
    picked_both |= set(take_ctc.tolist())
    # Scored by the decoder's distributions over the reading kept, tempered.
    forced = decode.teacher_forced_log_probs(CFG, params, images, out, widths=widths)
    written = np.asarray(decode.written_tokens(out))
    np.testing.assert_allclose(np.asarray(dists)[written], np.asarray(forced)[written],
                               rtol=1e-4, atol=1e-4)
    assert (np.asarray(dists)[~written] == 0).all() and (np.asarray(per_token)[~written] == 0).all()
    np.testing.assert_allclose(lp, calibration.line_log_probs(dists, out, 1.5), rtol=1e-5)
  assert picked_both == {True, False}  # The weights pick each reader somewhere.
  # With a beam, the decoder's hypothesis is the beam search's; at weight 0 a reading the CTC
  # head wrote wins only where the decoder finds it likelier than the beam's answer.
  by_beam, _ = decode.decode(CFG, params, images, widths=widths, beam_size=3)
  out, _ = decode.decode(CFG, params, images, widths=widths, reader="joint", beam_size=3,
                         ctc_weight=0.0)
  take_ctc = joint_score(by_ctc, 0.0) > joint_score(by_beam, 0.0)
  np.testing.assert_array_equal(out, np.where(take_ctc[:, None], by_ctc, by_beam))
  # Each line reads as it does alone, cut to its own width.
  out, lp = decode.decode(CFG, params, images, widths=widths, reader="joint")
  for i, cut in enumerate((48, 28, 16)):
    alone, alone_lp = decode.decode(CFG, params, images[i:i + 1, :, :cut], reader="joint")
    np.testing.assert_array_equal(out[i], alone[0])
    np.testing.assert_allclose(lp[i], alone_lp[0], rtol=1e-4, atol=1e-4)
