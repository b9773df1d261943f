"""The masked, weighted cross-entropy against numpy computed by hand, and the CTC loss against
the sum over every alignment."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit import losses
from digit_vit.models import tokens

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count

V = tokens.VOCAB_SIZE
# Two targets: "59" and "9", as the decoder sees them (no <sos>): [d.., <eos>, <pad>...].
TARGETS = np.array([[5, 9, tokens.EOS, tokens.PAD],
                    [9, tokens.EOS, tokens.PAD, tokens.PAD]], np.int32)


def _logits(seed=0):
  return np.random.default_rng(seed).normal(size=TARGETS.shape + (V,)).astype(np.float32)


def _nll(logits, targets):
  """-log softmax(logits)[target] in float64 numpy."""
  x = logits.astype(np.float64)
  log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  return log_z - np.take_along_axis(x, targets[..., None], -1)[..., 0]


def _loss(logits, **kwargs):
  label_smoothing = kwargs.pop("label_smoothing", 0.0)
  weights = losses.token_weights(jnp.asarray(TARGETS), **kwargs)
  return losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(TARGETS), weights,
                                       label_smoothing=label_smoothing)


def test_pad_positions_add_no_loss_and_no_gradient():
  logits = _logits()
  loss_sum, weight_sum = _loss(logits)
  pad = TARGETS == tokens.PAD
  np.testing.assert_allclose(loss_sum, _nll(logits, TARGETS)[~pad].sum(), rtol=1e-6)
  assert float(weight_sum) == (~pad).sum() == 5  # Digits and <eos> count, <pad> does not.

  # Anything at the <pad> positions changes nothing ...
  changed = logits.copy()
  changed[pad] = np.random.default_rng(1).normal(size=(pad.sum(), V)) * 50
  assert float(_loss(changed)[0]) == float(loss_sum)
  # ... and they get exactly zero gradient, while the others get some.
  grads = jax.grad(lambda x: _loss(x)[0])(jnp.asarray(logits))
  assert np.all(np.asarray(grads)[pad] == 0.0)
  assert np.all(np.abs(np.asarray(grads)[~pad]).sum(-1) > 1e-3)


def test_pad_counted_variant():
  logits = _logits()
  loss_sum, weight_sum = _loss(logits, ignore_pad=False)
  np.testing.assert_allclose(loss_sum, _nll(logits, TARGETS).sum(), rtol=1e-6)
  assert float(weight_sum) == TARGETS.size


@pytest.mark.parametrize("ignore_pad", [True, False])
def test_class_weights_as_by_hand(ignore_pad):
  """The seeds' experiment: digit 9 x2, <eos> and <pad> x0.5."""
  logits = _logits(2)
  vector = losses.class_weight_vector({"9": 2.0, "eos": 0.5, "<pad>": 0.5}, V)
  loss_sum, weight_sum = _loss(logits, ignore_pad=ignore_pad, class_weights=vector)
  by_hand = np.ones(TARGETS.shape)
  by_hand[TARGETS == 9] = 2.0
  by_hand[TARGETS == tokens.EOS] = 0.5
  by_hand[TARGETS == tokens.PAD] = 0.0 if ignore_pad else 0.5
  # Row 0: 5, 9, <eos>, <pad>; row 1: 9, <eos>, <pad>, <pad>.
  assert by_hand.sum() == (6.0 if ignore_pad else 7.5)
  np.testing.assert_allclose(weight_sum, by_hand.sum(), rtol=1e-6)
  np.testing.assert_allclose(loss_sum, (_nll(logits, TARGETS) * by_hand).sum(), rtol=1e-6)
  unweighted, _ = _loss(logits, ignore_pad=ignore_pad)
  assert abs(float(loss_sum) - float(unweighted)) > 1e-3


def test_label_smoothing_as_by_hand():
  logits, s = _logits(3), 0.1
  loss_sum, _ = _loss(logits, label_smoothing=s)
  x = logits.astype(np.float64)
  log_p = x - x.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  soft = np.full(TARGETS.shape + (V,), s / V)
  np.put_along_axis(soft, TARGETS[..., None], 1 - s + s / V, -1)
  per_token = -(soft * log_p).sum(-1)
  np.testing.assert_allclose(loss_sum, per_token[TARGETS != tokens.PAD].sum(), rtol=1e-6)


def test_example_mask_drops_rows():
  logits = _logits(4)
  loss_sum, weight_sum = _loss(logits, mask=np.array([True, False]))
  np.testing.assert_allclose(loss_sum, _nll(logits, TARGETS)[0, :3].sum(), rtol=1e-6)
  assert float(weight_sum) == 3


def test_class_weight_keys():
  vector = losses.class_weight_vector({"0": 3.0, "<eos>": 0.25, "sos": 0.0}, V)
  expected = np.ones(V)
  expected[[0, tokens.EOS, tokens.SOS]] = [3.0, 0.25, 0.0]
  np.testing.assert_array_equal(vector, expected)
  np.testing.assert_array_equal(losses.class_weight_vector({}, V), np.ones(V))
  with pytest.raises(ValueError, match="not a class index"):
    losses.class_weight_vector({"nine": 2.0}, V)
  with pytest.raises(ValueError, match="not a class index"):
    losses.class_weight_vector({"13": 2.0}, V)


def test_class_weights_string_form_equals_the_dict():
  """The command-line form of the seeds' weighting gives the same vector as the dict."""
  as_dict = losses.class_weight_vector({"9": 2.0, "eos": 0.5, "pad": 0.5}, V)
  for text in ("9:2,eos:0.5,pad:0.5", " 9 : 2 , <eos>:0.5, pad:.5 ,"):
    np.testing.assert_array_equal(losses.class_weight_vector(text, V), as_dict)
  assert losses.parse_class_weights("9:2,eos:0.5") == {"9": 2.0, "eos": 0.5}
  assert losses.parse_class_weights("") == {} and losses.parse_class_weights(None) == {}
  np.testing.assert_array_equal(losses.class_weight_vector("", V), np.ones(V))
  with pytest.raises(ValueError, match="'9=2' is not 'key:weight'"):
    losses.parse_class_weights("9=2")
  with pytest.raises(ValueError, match="is not 'key:weight'"):
    losses.parse_class_weights("9:two")
  with pytest.raises(ValueError, match="not a class index"):
    losses.class_weight_vector("nine:2", V)


def test_class_weights_from_the_command_line_reach_the_loss():
  """`--config.loss.class_weights=9:2,eos:0.5,pad:0.5` parses and weighs the targets."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from digit_vit import config_lib  # pylint: disable=import-outside-toplevel
  argv = ["prog", f"--config={config_lib.CONFIG_DIR / 'default.py'}",
          "--config.loss.class_weights=9:2,eos:0.5,pad:0.5"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  vector = losses.class_weight_vector(flag_values.config.loss.class_weights, V)
  assert vector[9] == 2.0 and vector[tokens.EOS] == 0.5 and vector[tokens.PAD] == 0.5
  assert vector[:9].tolist() == [1.0] * 9


# ---- CTC


def _ctc_by_enumeration(logits, digits):
  """-log P(digits) under CTC (blank = class 10) summed over every frame labelling in float64:
  the labellings that, with repeats merged and blanks dropped, spell `digits`."""
  x = logits.astype(np.float64)
  log_p = x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1))[:, None]
  frames, classes = log_p.shape
  total = 0.0
  for path in itertools.product(range(classes), repeat=frames):
    spelled = [c for i, c in enumerate(path)
               if c != tokens.CTC_BLANK and (i == 0 or c != path[i - 1])]
    if spelled == [int(d) for d in digits]:
      total += np.exp(sum(log_p[t, c] for t, c in enumerate(path)))
  return -np.log(total)


def test_ctc_loss_sums_every_alignment_and_skips_masked_rows():
  lines = ["12", "33", "7", "0"]  # "33" needs a blank between its two 3s.
  logits = np.random.default_rng(0).normal(size=(len(lines), 4, tokens.CTC_CLASSES))
  logits = logits.astype(np.float32)
  full_tokens = tokens.encode_batch(lines, 3)
  mask = np.array([True, True, True, False])
  loss_sum, lines_counted = losses.ctc_loss(jnp.asarray(logits), jnp.asarray(full_tokens),
                                            mask=jnp.asarray(mask))
  expected = [_ctc_by_enumeration(logits[i], lines[i]) for i in range(3)]
  np.testing.assert_allclose(float(loss_sum), sum(expected), rtol=1e-5)
  assert float(lines_counted) == 3.0
  # Every row counts without a mask; the fourth adds its own likelihood.
  loss_sum, lines_counted = losses.ctc_loss(jnp.asarray(logits), jnp.asarray(full_tokens))
  np.testing.assert_allclose(float(loss_sum),
                             sum(expected) + _ctc_by_enumeration(logits[3], "0"), rtol=1e-5)
  assert float(lines_counted) == 4.0


def test_ctc_loss_is_low_when_the_frames_spell_the_line():
  """Frames that say blank, 4, 4, blank, 2 spell '42' with probability near 1; the same frames
  against '24' are far less likely."""
  logits = np.full((1, 5, tokens.CTC_CLASSES), -10.0, np.float32)
  for t, c in enumerate([tokens.CTC_BLANK, 4, 4, tokens.CTC_BLANK, 2]):
    logits[0, t, c] = 10.0
  right, _ = losses.ctc_loss(jnp.asarray(logits), jnp.asarray(tokens.encode_batch(["42"], 3)))
  wrong, _ = losses.ctc_loss(jnp.asarray(logits), jnp.asarray(tokens.encode_batch(["24"], 3)))
  assert float(right) < 1e-3 < 10.0 < float(wrong)


def test_ctc_loss_ignores_the_frames_of_width_padding():
  """A line read over its 3 valid frames of 5 scores as the 3 frames alone, whatever the two
  padded frames hold."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, tokens.CTC_CLASSES)).astype(np.float32)
  logits[1, :3] = logits[0, :3]
  logits[1, 3:] = 50.0 * rng.normal(size=(2, tokens.CTC_CLASSES))  # Garbage in the padding.
  frame_mask = np.array([[True] * 3 + [False] * 2] * 2)
  full_tokens = tokens.encode_batch(["15", "15"], 3)
  per_row = [float(losses.ctc_loss(jnp.asarray(logits[i:i + 1]), jnp.asarray(full_tokens[:1]),
                                   frame_mask=jnp.asarray(frame_mask[:1]))[0]) for i in range(2)]
  expected = _ctc_by_enumeration(logits[0, :3], "15")
  np.testing.assert_allclose(per_row, [expected, expected], rtol=1e-5)
  unmasked, _ = losses.ctc_loss(jnp.asarray(logits[1:]), jnp.asarray(full_tokens[:1]))
  assert abs(float(unmasked) - expected) > 1.0
