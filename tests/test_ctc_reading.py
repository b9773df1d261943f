"""Reading a line with the CTC head's columns (`decode.reader='ctc'`): best path, the token
contract, scores the calibration can temper, masks, and the errors that say what to change."""

import dataclasses
import functools

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
  with pytest.raises(ValueError, match="decode.reader must be one of"):
    decode.decode(CFG, _params(), images, reader="columns")
  config = config_lib.load("tiny")
  config.decode.reader = "ctc"
  with pytest.raises(ValueError, match="ctc_head=True"):
    trained.read_with(config)
  config.model.ctc_head = True
  assert trained.read_with(config) == "ctc"
  with pytest.raises(ValueError, match="beam_size=4 does not apply"):
    trained.decoding(config, beam_size=4)  # predict's, evaluate's, export's --beam_size.
  config.decode.beam_size = 2  # The config's own beam, as config_checks reads it.
  with pytest.raises(ValueError, match="beam_size=2 does not apply"):
    trained.decoding(config)
  config.decode.reader = "columns"
  with pytest.raises(ValueError, match="must be one of"):
    trained.read_with(config)
