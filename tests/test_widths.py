"""Variable-width images: grids per width, padding masks, and padded columns changing nothing."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit.models import DigitReader, ModelConfig, patch, tokens
from digit_vit.models.reader import ctc_frame_mask, patch_mask

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count

# Two rows of 8x8 patches, 16 columns at the widest width: narrower images use a leading part
# of a grid that has more than one row, which a 1-D raster table must index by (row, column).
BASE = ModelConfig(width=32, num_heads=2, mlp_dim=64, encoder_layers=1, decoder_layers=1,
                   image_height=16, image_width=128, patch_size=(8, 8), max_length=6)
# Every stem op that reads a neighbour to the right: a stride-1 conv after each strided conv.
CONV = dict(stem_channels=4, stem_depth=1)


def _perturbed(params, seed=5, scale=0.2):
  """Params with noise on every leaf: at initialisation the biases are zero, and a stem with
  zero biases maps zero padding to zero features, which would hide a stem that sees padding."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _pad_to(images, width):
  return jnp.pad(images, ((0, 0), (0, 0), (0, width - images.shape[2]), (0, 0)))


def test_grid_for_any_width_up_to_the_widest():
  assert BASE.grid == (2, 16) and BASE.grid_for(128) == BASE.grid
  assert BASE.grid_for(64) == (2, 8) and BASE.grid_for(8) == (2, 1)
  for bad in (60, 0, 136, -8):
    with pytest.raises(ValueError, match="multiple of the patch width 8"):
      BASE.grid_for(bad)
  model = DigitReader(BASE)
  # Shapes only (the checks run while tracing): real parameters would cost seconds.
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 128, 1)),
                          jnp.zeros((1, 6), jnp.int32))
  encode = lambda shape: jax.eval_shape(  # noqa: E731
      lambda p, x: model.apply(p, x, method=DigitReader.encode), params, jnp.zeros(shape))
  chex.assert_shape(encode((1, 16, 64, 1)), (1, 16, BASE.width))
  for shape in ((1, 16, 60, 1), (1, 16, 256, 1)):
    with pytest.raises(ValueError, match="model.image_width=128"):
      encode(shape)
  with pytest.raises(ValueError, match="model.image_height=16"):
    encode((1, 32, 64, 1))


def test_patch_mask_flags_the_columns_that_start_inside_the_valid_width():
  widths = jnp.array([64, 60, 57, 56, 1, 0, 200])
  cols = np.asarray(ctc_frame_mask(BASE, widths, 96))
  chex.assert_shape(cols, (7, 12))
  # A column starts at 8c; one the valid width covers only in part holds ink, so it counts.
  np.testing.assert_array_equal(cols.sum(axis=1), [8, 8, 8, 7, 1, 0, 12])
  np.testing.assert_array_equal(cols[1], np.arange(12) < 8)
  mask = np.asarray(patch_mask(BASE, widths, 96))
  chex.assert_shape(mask, (7, 24))  # Two rows in raster order: each row repeats the columns.
  np.testing.assert_array_equal(mask, np.concatenate([cols, cols], axis=1))
  with_class = np.asarray(patch_mask(dataclasses.replace(BASE, class_token=True), widths, 96))
  chex.assert_shape(with_class, (7, 25))
  assert with_class[:, 0].all()  # The class token is always there to attend to.
  np.testing.assert_array_equal(with_class[:, 1:], mask)


@pytest.mark.parametrize("options", [
    dict(patch_size=(8, 4)),  # Strides (2, 2), (2, 2), (2, 1): the last reads to its right.
    dict(patch_size=(8, 8), stem_depth=1),
], ids=["col-stride-1", "stem-depth"])
def test_conv_stem_gives_valid_patches_as_if_the_image_ended_there(options):
  layer = patch.PatchEmbedding(width=8, kind="conv", stem_channels=4, **options)
  pw = layer.patch_size[1]
  images = jax.random.uniform(jax.random.key(0), (2, 16, 48, 1))
  # Image 0 is 48 pixels wide; image 1 is 45 (its last column partly covered), junk past it.
  junk = jax.random.uniform(jax.random.key(1), (2, 16, 96, 1)) + 1.0
  padded = jnp.concatenate([images, junk[:, :, 48:]], axis=2)
  padded = padded.at[1, :, 45:].set(junk[1, :, 45:])
  widths = jnp.array([48, 45])
  params = _perturbed(layer.init(jax.random.key(2), padded)["params"])

  @jax.jit
  def run(params):
    cut = images.at[1, :, 45:].set(0.0)  # What image 1 is: 45 pixels, then background.
    return (layer.apply({"params": params}, padded, widths),
            layer.apply({"params": params}, cut),
            layer.apply({"params": params}, _pad_to(images, 96)))

  out, alone, unmasked = run(params)
  rows, cols = 16 // layer.patch_size[0], 48 // pw
  chex.assert_shape(out, (2, rows * 96 // pw, 8))
  out = out.reshape(2, rows, 96 // pw, 8)[:, :, :cols]
  np.testing.assert_allclose(out, alone.reshape(2, rows, cols, 8), atol=1e-5, rtol=1e-5)
  # Without widths the stem's convs see the padding (gelu(bias) past the image, not the zeros
  # of its own padding), so the last valid column differs: the masking is what makes it equal.
  unmasked = unmasked.reshape(2, rows, 96 // pw, 8)[:, :, :cols]
  assert np.abs(unmasked[0, :, -1] - alone.reshape(2, rows, cols, 8)[0, :, -1]).max() > 1e-3


# A strength-2 covering of (patch embedding, norm, class token) for every position kind: each
# kind runs with both embeddings, both norms and with and without the class token (two
# complementary runs), and the four complementary pairs together give all eight combinations.
_PAIRS = [(("linear", "pre", False), ("conv", "post", True)),
          (("linear", "pre", True), ("conv", "post", False)),
          (("linear", "post", False), ("conv", "pre", True)),
          (("linear", "post", True), ("conv", "pre", False))]
_KINDS = ("learned", "learned_2d", "sinusoidal", "sinusoidal_2d", "rope", "none")
_CASES = [(kind,) + combo for i, kind in enumerate(_KINDS) for combo in _PAIRS[i % 4]]


def _random_params(model, images, inputs, seed=5):
  """Random parameters of every leaf (LayerNorm scales around 1), built from the shapes alone:
  tracing `init` too would double what these tests compile. Zero biases, as at initialisation,
  would map zero padding to zero features in the stem and hide a stem that sees padding."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images, inputs)["params"]
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(jax.tree.structure(shapes), [
      (1.0 if path[-1].key == "scale" else 0.0) + 0.3 * jax.random.normal(k, leaf.shape)
      for (path, leaf), k in zip(leaves, keys)])


def _read(model, images, inputs, widths):
  """Memory, decoder logits and CTC logits of one encoder pass (a `DigitReader` method)."""
  memory = model.encode(images, widths=widths)
  mask = None if widths is None else patch_mask(model.config, widths, images.shape[2])
  return (memory, model.decode_tokens(inputs, memory, memory_mask=mask),
          model.ctc_head(memory))


def _check_padded_against_alone(cfg, images, widths, cuts):
  """The batch `images` padded to 128 pixels and read with `widths` gives, on its valid patches,
  the memory, logits and CTC frames of each image i read alone cut to `cuts[i]` pixels."""
  padded = _pad_to(images, 128)
  inputs = jax.random.randint(jax.random.key(1), (len(cuts), 6), 0, 10).at[:, 0].set(tokens.SOS)
  model = DigitReader(cfg)
  params = _random_params(model, padded, inputs)
  groups = {cut: [i for i, c in enumerate(cuts) if c == cut] for cut in set(cuts)}

  @jax.jit
  def run(params):
    read = lambda x, i, w: model.apply({"params": params}, x, i, w, method=_read)  # noqa: E731
    alone = {cut: read(images[jnp.array(rows), :, :cut], inputs[jnp.array(rows)], None)
             for cut, rows in groups.items()}
    return read(padded, inputs, widths), alone

  (memory, logits, ctc), alone = run(params)
  chex.assert_shape(memory, (len(cuts), cfg.num_patches + cfg.class_token, cfg.width))
  chex.assert_shape(ctc, (len(cuts), cfg.grid[1], tokens.CTC_CLASSES))
  valid = np.asarray(patch_mask(cfg, widths, 128))
  frames = np.asarray(ctc_frame_mask(cfg, widths, 128))
  for cut, rows in groups.items():
    for j, i in enumerate(rows):
      alone_memory, alone_logits, alone_ctc = (np.asarray(x[j]) for x in alone[cut])
      chex.assert_shape(alone_memory, (valid[i].sum(), cfg.width))
      np.testing.assert_allclose(np.asarray(memory[i])[valid[i]], alone_memory, atol=1e-5,
                                 rtol=1e-5, err_msg=f"memory of image {i}")
      np.testing.assert_allclose(logits[i], alone_logits, atol=1e-5, rtol=1e-5,
                                 err_msg=f"logits of image {i}")
      np.testing.assert_allclose(np.asarray(ctc[i])[frames[i]], alone_ctc, atol=1e-5,
                                 rtol=1e-5, err_msg=f"CTC frames of image {i}")


@pytest.mark.parametrize("kind,embedding,norm,class_token", _CASES)
def test_padded_columns_change_nothing(kind, embedding, norm, class_token):
  """Two images 64 pixels wide, padded to a 128-pixel bucket with widths 64, read as alone."""
  cfg = dataclasses.replace(BASE, encoder_position=kind, patch_embedding=embedding, norm=norm,
                            class_token=class_token, ctc_head=True,
                            # Residual stride-1 convs read past a column's right edge.
                            **(dict(stem_channels=4, stem_depth=1) if embedding == "conv" else {}))
  images = jax.random.uniform(jax.random.key(0), (2, 16, 64, 1))
  _check_padded_against_alone(cfg, images, jnp.array([64, 64]), (64, 64))


def test_padded_columns_change_nothing_with_mixed_widths_and_a_partial_column():
  """Widths 64, 44 (5.5 columns) and 8 in one batch, every stem op that reads to its right,
  1-D learned positions over two rows and the class token."""
  cfg = dataclasses.replace(BASE, patch_embedding="conv", class_token=True, ctc_head=True,
                            **CONV)
  images = jax.random.uniform(jax.random.key(0), (3, 16, 64, 1))
  images = images.at[1, :, 44:].set(0.0).at[2, :, 8:].set(0.0)
  _check_padded_against_alone(cfg, images, jnp.array([64, 44, 8]), (64, 48, 8))


def test_without_widths_the_padding_is_read():
  """The masks matter: the same padded batch without widths gives other logits."""
  cfg = dataclasses.replace(BASE, encoder_position="rope")
  images = _pad_to(jax.random.uniform(jax.random.key(0), (2, 16, 64, 1)), 128)
  inputs = jnp.full((2, 6), tokens.SOS, jnp.int32)
  model = DigitReader(cfg)
  params = _random_params(model, images, inputs)
  masked = model.apply({"params": params}, images, inputs, widths=jnp.array([64, 64]))
  unmasked = model.apply({"params": params}, images, inputs)
  assert np.abs(masked - unmasked).max() > 1e-3
  # All columns valid is the same as no widths.
  np.testing.assert_allclose(
      model.apply({"params": params}, images, inputs, widths=jnp.array([128, 128])), unmasked,
      atol=1e-5, rtol=1e-5)
