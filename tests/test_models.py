"""Shapes, dtypes and the decode cache of the reader and classifier, for several configs."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit.models import DigitReader, ModelConfig, ViTClassifier, blocks, patch, tokens

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count

SMALL = dict(width=32, num_heads=2, mlp_dim=64, encoder_layers=1, decoder_layers=2)
CONFIGS = {
    "linear-learned": ModelConfig(**SMALL),
    "conv-rope-post": ModelConfig(**SMALL, patch_embedding="conv", encoder_position="rope",
                                  decoder_position="rope", norm="post",
                                  attention_impl="einsum"),
    "tall-patches-sin2d": ModelConfig(**SMALL, patch_size=(16, 4),
                                      encoder_position="sinusoidal_2d",
                                      decoder_position="sinusoidal",
                                      attention_impl="custom_vjp"),
    "small-canvas-1head": ModelConfig(**dict(SMALL, num_heads=1), image_height=16,
                                      image_width=48, patch_size=(4, 4), max_length=4,
                                      encoder_position="learned_2d", decoder_position="none"),
}


def _inputs(cfg, batch=3, seed=0):
  images = jax.random.uniform(jax.random.key(seed), (batch, cfg.image_height, cfg.image_width,
                                                     cfg.image_channels))
  decoder_inputs = jax.random.randint(jax.random.key(seed + 1), (batch, cfg.max_length), 0,
                                      tokens.VOCAB_SIZE)
  return images, decoder_inputs.at[:, 0].set(tokens.SOS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reader_shapes_and_dtypes(name):
  cfg = CONFIGS[name]
  model = DigitReader(cfg)
  images, decoder_inputs = _inputs(cfg)
  variables = model.init(jax.random.key(0), images, decoder_inputs)
  memory = model.apply(variables, images, method=DigitReader.encode)
  chex.assert_shape(memory, (3, cfg.num_patches, cfg.width))
  logits = model.apply(variables, images, decoder_inputs)
  chex.assert_shape(logits, (3, cfg.max_length, tokens.VOCAB_SIZE))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  for leaf in jax.tree.leaves(variables["params"]):
    chex.assert_type(leaf, jnp.float32)


def test_ctc_head_scores_each_column_from_the_mean_of_its_patches():
  cfg = dataclasses.replace(CONFIGS["small-canvas-1head"], ctc_head=True)  # A 4x12 grid.
  model = DigitReader(cfg)
  images, decoder_inputs = _inputs(cfg)
  variables = model.init(jax.random.key(0), images, decoder_inputs)
  chex.assert_shape(variables["params"]["ctc_head"]["logits"]["kernel"],
                    (cfg.width, tokens.CTC_CLASSES))
  logits, ctc_logits = model.apply(variables, images, decoder_inputs, return_ctc=True)
  chex.assert_shape(ctc_logits, (3, cfg.ctc_frames, tokens.CTC_CLASSES))
  assert cfg.ctc_frames == 12
  np.testing.assert_array_equal(logits, model.apply(variables, images, decoder_inputs))
  # By hand: the encoder's output averaged over the grid's rows, then the head's dense layer.
  memory = model.apply(variables, images, method=DigitReader.encode)
  frames = memory.reshape(3, 4, 12, cfg.width).mean(axis=1)
  dense = variables["params"]["ctc_head"]["logits"]
  np.testing.assert_allclose(ctc_logits, frames @ dense["kernel"] + dense["bias"], atol=1e-5)
  # A model without the head has no such params, and asking for its logits is an error.
  plain = DigitReader(CONFIGS["small-canvas-1head"])
  plain_variables = plain.init(jax.random.key(0), images, decoder_inputs)
  assert "ctc_head" not in plain_variables["params"]
  with pytest.raises(ValueError, match="model.ctc_head=True"):
    plain.apply(plain_variables, images, decoder_inputs, return_ctc=True)


def test_bench_architecture_has_1_35m_parameters():
  cfg = ModelConfig()  # the defaults are the bench architecture
  images, decoder_inputs = _inputs(cfg, batch=1)
  params = jax.eval_shape(DigitReader(cfg).init, jax.random.key(0), images, decoder_inputs)
  assert sum(x.size for x in jax.tree.leaves(params)) == 1_347_853
  assert cfg.num_patches == 96


def test_bfloat16_compute_keeps_float32_params():
  cfg = dataclasses.replace(CONFIGS["linear-learned"], dtype="bfloat16")
  model = DigitReader(cfg)
  images, decoder_inputs = _inputs(cfg)
  variables = model.init(jax.random.key(0), images, decoder_inputs)
  for leaf in jax.tree.leaves(variables["params"]):
    chex.assert_type(leaf, jnp.float32)
  memory = model.apply(variables, images, method=DigitReader.encode)
  chex.assert_type(memory, jnp.bfloat16)
  logits = model.apply(variables, images, decoder_inputs)
  chex.assert_type(logits, jnp.float32)
  full = DigitReader(dataclasses.replace(cfg, dtype="float32")).apply(variables, images,
                                                                        decoder_inputs)
  np.testing.assert_allclose(logits, full, atol=0.15)


def test_bfloat16_matmuls_keep_float32_activations_and_stay_close():
  """matmul_dtype='bfloat16' rounds the dense layers' operands only: the same parameters,
  float32 memory and logits, within bfloat16 rounding of the float32 model's, and gradients
  within a few percent."""
  cfg = CONFIGS["linear-learned"]
  rounded = DigitReader(dataclasses.replace(cfg, matmul_dtype="bfloat16"))
  full = DigitReader(cfg)
  images, decoder_inputs = _inputs(cfg)
  variables = full.init(jax.random.key(0), images, decoder_inputs)
  chex.assert_trees_all_equal_shapes(
      variables, rounded.init(jax.random.key(0), images, decoder_inputs))
  chex.assert_type(rounded.apply(variables, images, method=DigitReader.encode), jnp.float32)

  def loss(model):
    return lambda p: jnp.mean(model.apply({"params": p}, images, decoder_inputs) ** 2)
  (got, got_grads), (want, want_grads) = (jax.value_and_grad(loss(m))(variables["params"])
                                          for m in (rounded, full))
  assert got != want                      # It does round...
  np.testing.assert_allclose(got, want, rtol=1e-2)   # ...at bfloat16's precision.
  distance = _relative_distance(got_grads, want_grads)
  assert distance < 0.05, distance


def _relative_distance(a, b):
  """|a - b| / |b| over all leaves of two gradient trees."""
  diff = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  norm = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return (diff / norm) ** 0.5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_equals_teacher_forcing(name):
  """Every prefix length 1..max_length, batch 4."""
  cfg = CONFIGS[name]
  steps = cfg.max_length
  images, decoder_inputs = _inputs(cfg, batch=4, seed=7)
  variables = DigitReader(cfg).init(jax.random.key(0), images, decoder_inputs)
  full = DigitReader(cfg).apply(variables, images, decoder_inputs)
  memory = DigitReader(cfg).apply(variables, images, method=DigitReader.encode)
  cached_model = DigitReader(cfg, decode=True)
  _, state = cached_model.apply(variables, memory, method=DigitReader.init_cache,
                                mutable=["cache"])
  cache = state["cache"]
  # Jitted once: eager dispatch of every step took most of the test's time.
  decode_step = jax.jit(lambda cache, token: cached_model.apply(
      {"params": variables["params"], "cache": cache}, token, memory,
      method=DigitReader.decode_tokens, mutable=["cache"]))
  for t in range(steps):
    logits, state = decode_step(cache, decoder_inputs[:, t:t + 1])
    cache = state["cache"]
    chex.assert_shape(logits, (4, 1, tokens.VOCAB_SIZE))
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-5)


def test_cache_holds_projected_memory_once():
  cfg = CONFIGS["linear-learned"]
  images, decoder_inputs = _inputs(cfg, batch=2)
  variables = DigitReader(cfg).init(jax.random.key(0), images, decoder_inputs)
  memory = DigitReader(cfg).apply(variables, images, method=DigitReader.encode)
  _, state = DigitReader(cfg, decode=True).apply(variables, memory,
                                                 method=DigitReader.init_cache,
                                                 mutable=["cache"])
  block = state["cache"]["decoder"]["block0"]
  heads, head_dim = cfg.num_heads, cfg.width // cfg.num_heads
  chex.assert_shape(block["cross_attention"]["cross_key"], (2, cfg.num_patches, heads, head_dim))
  chex.assert_shape(block["self_attention"]["cached_key"], (2, cfg.max_length, heads, head_dim))
  assert int(block["self_attention"]["cache_index"]) == 0


def test_decoder_is_causal():
  cfg = CONFIGS["linear-learned"]
  images, decoder_inputs = _inputs(cfg, batch=2)
  model = DigitReader(cfg)
  variables = model.init(jax.random.key(0), images, decoder_inputs)
  base = model.apply(variables, images, decoder_inputs)
  changed = decoder_inputs.at[:, 4:].set((decoder_inputs[:, 4:] + 1) % tokens.VOCAB_SIZE)
  out = model.apply(variables, images, changed)
  np.testing.assert_allclose(out[:, :4], base[:, :4], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out[:, 4:], base[:, 4:])


def test_dropout_needs_rng_and_changes_training_outputs():
  cfg = dataclasses.replace(CONFIGS["linear-learned"], dropout_rate=0.5)
  images, decoder_inputs = _inputs(cfg)
  model = DigitReader(cfg)
  variables = model.init(jax.random.key(0), images, decoder_inputs)
  a = model.apply(variables, images, decoder_inputs, train=True,
                  rngs={"dropout": jax.random.key(1)})
  b = model.apply(variables, images, decoder_inputs, train=True,
                  rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(model.apply(variables, images, decoder_inputs),
                                model.apply(variables, images, decoder_inputs))


@pytest.mark.parametrize("channels,hw,patch_size,stem", [
    (1, (28, 28), (7, 7), "linear"), (3, (32, 32), (4, 4), "conv"),
    (3, (32, 32), (8, 4), "conv")])
def test_classifier_shapes(channels, hw, patch_size, stem):
  cfg = ModelConfig(**SMALL, image_height=hw[0], image_width=hw[1], image_channels=channels,
                    patch_size=patch_size, patch_embedding=stem, class_token=True,
                    num_classes=10, encoder_position="learned")
  model = ViTClassifier(cfg)
  images = jnp.ones((5,) + hw + (channels,))
  variables = model.init(jax.random.key(0), images)
  chex.assert_shape(variables["params"]["encoder"]["class_token"], (1, 1, cfg.width))
  chex.assert_shape(variables["params"]["encoder"]["position"]["embedding"],
                    (cfg.num_patches, cfg.width))
  logits = model.apply(variables, images)
  chex.assert_shape(logits, (5, 10))
  chex.assert_type(logits, jnp.float32)


def test_patch_embedding_linear_is_a_projection_of_flattened_patches():
  images = jax.random.uniform(jax.random.key(0), (2, 8, 12, 1))
  layer = patch.PatchEmbedding((4, 6), width=5)
  variables = layer.init(jax.random.key(1), images)
  out = layer.apply(variables, images)
  chex.assert_shape(out, (2, 4, 5))
  kernel = np.asarray(variables["params"]["projection"]["kernel"])
  bias = np.asarray(variables["params"]["projection"]["bias"])
  second_patch = np.asarray(images[1, 0:4, 6:12, 0]).reshape(-1)  # row 0, column 1
  np.testing.assert_allclose(out[1, 1], second_patch @ kernel + bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (2, 1)])
def test_conv3x3_is_a_dense_layer_on_the_neighbourhoods(channels, stride):
  # One channel runs as that matmul; more run lax.conv with the same parameters.
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, channels))
  layer = patch.Conv3x3(5, stride)
  params = layer.init(jax.random.key(1), x)["params"]
  chex.assert_shape(params["kernel"], (9 * channels, 5))
  chex.assert_shape(params["bias"], (5,))
  params = dict(params, bias=jnp.arange(5.0))

  def reference(params, x):
    return patch._neighbourhoods(x, stride) @ params["kernel"] + params["bias"]

  out = layer.apply({"params": params}, x)
  chex.assert_shape(out, (2, 8 // stride[0], 12 // stride[1], 5))
  np.testing.assert_allclose(out, reference(params, x), rtol=1e-5, atol=1e-5)
  if stride == (1, 1):
    # Element (row 1, col 0) sums its 3x3 window, zeros past the edge.
    window = np.zeros((3, 3, channels))
    window[:, 1:] = x[0, 0:3, 0:2]
    kernel = np.asarray(params["kernel"]).reshape(3, 3, channels, 5)
    np.testing.assert_allclose(out[0, 1, 0], np.einsum("hwc,hwcf->f", window, kernel)
                               + np.arange(5.0), rtol=1e-5, atol=1e-5)
  # Training sees the same gradients, for the parameters and the input.
  loss = lambda fn: lambda p, x: jnp.sum(jnp.sin(fn(p, x)))  # noqa: E731
  got = jax.grad(loss(lambda p, x: layer.apply({"params": p}, x)), argnums=(0, 1))(params, x)
  want = jax.grad(loss(reference), argnums=(0, 1))(params, x)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_conv_stem_runs_its_convs_through_conv3x3():
  # Conv3x3 once existed beside a stem that still ran every conv as slices and a matmul: the
  # same numbers, but configs/long.py's train step 1.4-1.7x as slow. So count the stem's convs.
  images = jax.random.uniform(jax.random.key(0), (2, 32, 16, 1))
  layer = patch.PatchEmbedding((8, 4), width=12, kind="conv", stem_channels=4, stem_depth=1)
  params = layer.init(jax.random.key(1), images)["params"]
  # Strides (2, 2), (2, 2), (2, 1), a residual conv after each; names and shapes as before.
  assert set(params) == {"conv0", "conv0_0", "conv1", "conv1_0", "conv2", "conv2_0",
                         "projection"}
  chex.assert_shape([params["conv0"]["kernel"], params["conv1"]["kernel"],
                     params["conv2_0"]["kernel"]], [(9, 4), (36, 8), (144, 16)])
  jaxpr = jax.make_jaxpr(lambda p: layer.apply({"params": p}, images))(params)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 5  # All but the one-channel image's conv0, which keeps the matmul.
  # The stem's output is still each conv computed on the neighbourhoods.
  _, state = layer.apply({"params": params}, images, capture_intermediates=True)
  conv = lambda name: state["intermediates"][name]["__call__"][0]  # noqa: E731
  x0 = jax.nn.gelu(conv("conv0"))
  expected = (patch._neighbourhoods(x0, (1, 1)) @ params["conv0_0"]["kernel"]
              + params["conv0_0"]["bias"])
  np.testing.assert_allclose(conv("conv0_0"), expected, rtol=1e-5, atol=1e-5)


def test_stem_depth_adds_residual_stride_one_convs():
  images = jax.random.uniform(jax.random.key(0), (2, 32, 16, 1))
  plain = patch.PatchEmbedding((8, 4), width=12, kind="conv", stem_channels=4)
  deep = patch.PatchEmbedding((8, 4), width=12, kind="conv", stem_channels=4, stem_depth=2)
  plain_vars = plain.init(jax.random.key(1), images)
  deep_vars = deep.init(jax.random.key(1), images)
  plain_params, deep_params = plain_vars["params"], deep_vars["params"]
  # Three strided convs of 4, 8, 16 channels; two residual convs after each keep its width.
  assert set(deep_params) == set(plain_params) | {f"conv{i}_{j}" for i in range(3)
                                                  for j in range(2)}
  for i, c in enumerate((4, 8, 16)):
    for j in range(2):
      chex.assert_shape(deep_params[f"conv{i}_{j}"]["kernel"], (9 * c, c))
  chex.assert_shape(deep.apply(deep_vars, images), (2, 16, 12))
  # Zeroed residual convs add gelu(0) = 0: the deep stem then equals the plain one.
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if "_" in path[0].key else v, deep_params)
  for name in plain_params:
    zeroed[name] = plain_params[name]
  np.testing.assert_allclose(deep.apply({"params": zeroed}, images),
                             plain.apply(plain_vars, images), rtol=1e-6)
  capped = patch.PatchEmbedding((8, 4), width=12, kind="conv", stem_channels=4, stem_depth=1,
                                stem_max_channels=8)
  capped_params = capped.init(jax.random.key(1), images)["params"]
  # Channels 4, 8, then 8 again instead of 16.
  chex.assert_shape(capped_params["conv2"]["kernel"], (9 * 8, 8))
  chex.assert_shape(capped_params["conv2_0"]["kernel"], (9 * 8, 8))
  chex.assert_shape(capped_params["projection"]["kernel"], (8, 12))
  with pytest.raises(ValueError, match="stem_depth"):
    patch.PatchEmbedding((8, 4), width=12, kind="conv", stem_depth=-1).init(
        jax.random.key(1), images)
  with pytest.raises(ValueError, match="stem_max_channels"):
    patch.PatchEmbedding((8, 4), width=12, kind="conv", stem_max_channels=-1).init(
        jax.random.key(1), images)


@pytest.mark.parametrize("option", [{"stem_depth": 1}, {"stem_max_channels": 64}])
def test_stem_options_with_the_linear_embedding_are_an_error(option):
  images = jnp.zeros((1, 32, 16, 1))
  layer = patch.PatchEmbedding((8, 4), width=12, kind="linear", **option)
  with pytest.raises(ValueError, match="patch_embedding='conv'"):
    layer.init(jax.random.key(0), images)
  # The same option on the conv stem is fine.
  conv_vars = patch.PatchEmbedding((8, 4), width=12, kind="conv", **option).init(
      jax.random.key(0), images)
  assert "conv0" in conv_vars["params"]


def test_conv_stem_strides_reach_non_square_patches():
  assert patch.stem_strides((8, 8)) == [(2, 2)] * 3
  assert patch.stem_strides((4, 8)) == [(2, 2), (2, 2), (1, 2)]
  assert patch.stem_strides((16, 4)) == [(2, 2), (2, 2), (2, 1), (2, 1)]
  with pytest.raises(ValueError, match="power-of-two"):
    patch.stem_strides((6, 8))


@pytest.mark.parametrize("field,value,match", [
    ("patch_size", (5, 5), "does not tile"),
    ("num_heads", 3, "divisible"),
    ("encoder_position", "fourier", "encoder_position"),
    ("attention_impl", "flash", "attention_impl"),
    ("norm", "sandwich", "norm"),
    ("matmul_dtype", "float16", "matmul_dtype"),
])
def test_bad_model_config_is_a_clear_error(field, value, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{field: value})


def test_unknown_model_key_is_an_error():
  with pytest.raises(ValueError, match="unknown model config keys"):
    ModelConfig.from_config({"widht": 64})


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_encoder_block_shapes(norm):
  x = jnp.ones((2, 10, 16))
  block = blocks.EncoderBlock(num_heads=2, mlp_dim=32, norm=norm)
  variables = block.init(jax.random.key(0), x)
  chex.assert_shape(block.apply(variables, x), (2, 10, 16))
  assert set(variables["params"]) == {"attention", "attention_residual", "mlp",
                                      "mlp_residual"}


def test_gelu_is_the_exact_gelu_and_differentiates_like_it():
  # The erf form replaces jax.nn.gelu's slower erfc form; values and gradients must agree.
  x = jnp.linspace(-10.0, 10.0, 20_001, dtype=jnp.float32)
  np.testing.assert_allclose(blocks.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
  grad = jax.vmap(jax.grad(blocks.gelu))(x)
  reference = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(grad, reference, atol=2e-6)
  assert blocks.activation_fn("gelu") is blocks.gelu
  assert blocks.gelu(jnp.ones((2,), jnp.bfloat16)).dtype == jnp.bfloat16


def test_attention_impl_switch_changes_speed_not_the_model():
  # The same parameters give the same logits and gradients whichever implementation runs.
  cfg = CONFIGS["linear-learned"]
  images, decoder_inputs = _inputs(cfg)
  params = DigitReader(cfg).init(jax.random.key(0), images, decoder_inputs)["params"]

  def logits_and_grads(impl):
    model = DigitReader(dataclasses.replace(cfg, attention_impl=impl))
    forward = lambda p: model.apply({"params": p}, images, decoder_inputs)  # noqa: E731
    # Jitted: eager dispatch of the model and its gradient took most of the test's time.
    return jax.jit(lambda p: (forward(p), jax.grad(lambda q: jnp.sum(forward(q) ** 2))(p)))(
        params)

  logits, grads = logits_and_grads("xla")
  for impl in ("einsum", "custom_vjp"):
    other_logits, other_grads = logits_and_grads(impl)
    np.testing.assert_allclose(other_logits, logits, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(other_grads, grads, rtol=1e-3, atol=1e-5)


# ---- Randomized positions (Ruoss et al. 2023)

# A 2 x 8 grid of patches at the widest width; decoder positions far past training's 9.
RANDOM = dict(SMALL, image_height=16, image_width=64, patch_size=(8, 8), max_length=24)


def _sown(state, module, name):
  return np.asarray(state["intermediates"][module][name][0])


@pytest.mark.parametrize("kind", ["learned", "sinusoidal", "rope"])
def test_random_decoder_positions_are_drawn_in_training_only(kind):
  cfg = ModelConfig(**RANDOM, decoder_position=kind, random_positions=True)
  images = jax.random.uniform(jax.random.key(0), (3, 16, 64, 1))
  inputs = jax.random.randint(jax.random.key(1), (3, 9), 0, 10).at[:, 0].set(tokens.SOS)
  model = DigitReader(cfg)
  params = model.init(jax.random.key(2), images, inputs)["params"]
  run = jax.jit(lambda params, rngs, train: model.apply(
      {"params": params}, images, inputs, train=train, rngs=rngs, mutable=["intermediates"]),
                static_argnums=2)
  logits, state = run(params, {"positions": jax.random.key(3)}, True)
  drawn = _sown(state, "decoder", "positions")
  chex.assert_shape(drawn, (3, 9))
  assert (np.diff(drawn, axis=1) > 0).all() and drawn.min() >= 0 and drawn.max() < 24
  assert not (drawn == np.arange(9)).all(axis=1).any()  # P(0..8 drawn) = 1 / C(24, 9).
  other_logits, other = run(params, {"positions": jax.random.key(4)}, True)
  assert not np.array_equal(_sown(other, "decoder", "positions"), drawn)
  assert not np.allclose(other_logits, logits, atol=1e-4)
  # Without a 'positions' stream they come from 'dropout', which training always passes.
  _, from_dropout = run(params, {"dropout": jax.random.key(3)}, True)
  chex.assert_shape(_sown(from_dropout, "decoder", "positions"), (3, 9))
  # In evaluation they are 0..t-1: the model is the one without the flag.
  eval_logits, eval_state = run(params, {}, False)
  np.testing.assert_array_equal(_sown(eval_state, "decoder", "positions"), np.arange(9))
  plain = DigitReader(dataclasses.replace(cfg, random_positions=False))
  np.testing.assert_allclose(eval_logits, plain.apply({"params": params}, images, inputs),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="rng"):
    model.apply({"params": params}, images, inputs, train=True)
  if kind == "learned":
    # Training logits are the evaluation logits of a table whose rows 0..8 are the drawn ones.
    for i in range(3):
      table = params["decoder"]["position"]["embedding"]
      moved = jax.tree.map(lambda x: x, params)
      moved["decoder"]["position"]["embedding"] = table.at[:9].set(table[drawn[i]])
      np.testing.assert_allclose(run(moved, {}, False)[0][i], logits[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["learned", "learned_2d", "rope"])
def test_random_encoder_columns_are_drawn_in_training_only(kind):
  cfg = ModelConfig(**RANDOM, encoder_position=kind, random_encoder_positions=True)
  images = jax.random.uniform(jax.random.key(0), (2, 16, 32, 1))  # 4 of the 8 columns.
  model = DigitReader(cfg)
  params = model.init(jax.random.key(2), images, jnp.zeros((2, 9), jnp.int32))["params"]
  run = jax.jit(lambda params, rngs, train: model.apply(
      {"params": params}, images, train=train, rngs=rngs, mutable=["intermediates"],
      method=DigitReader.encode), static_argnums=2)
  memory, state = run(params, {"positions": jax.random.key(3)}, True)
  drawn = _sown(state, "encoder", "column_positions")
  chex.assert_shape(drawn, (2, 4))
  assert (np.diff(drawn, axis=1) > 0).all() and drawn.min() >= 0 and drawn.max() < 8
  _, other = run(params, {"positions": jax.random.key(4)}, True)
  assert not np.array_equal(_sown(other, "encoder", "column_positions"), drawn)
  eval_memory, eval_state = run(params, {}, False)
  np.testing.assert_array_equal(_sown(eval_state, "encoder", "column_positions"), np.arange(4))
  plain = DigitReader(dataclasses.replace(cfg, random_encoder_positions=False))
  np.testing.assert_allclose(
      eval_memory, plain.apply({"params": params}, images, method=DigitReader.encode),
      rtol=1e-5, atol=1e-5)
  assert not np.allclose(memory, eval_memory, atol=1e-4)
  if kind == "learned":
    # The raster table's (row, drawn column) entries, moved to (row, column): both rows move.
    for i in range(2):
      table = params["encoder"]["position"]["embedding"]
      rows = np.repeat([0, 1], 4)
      moved = jax.tree.map(lambda x: x, params)
      moved["encoder"]["position"]["embedding"] = table.at[rows * 8 + np.tile(np.arange(4), 2)
                                                           ].set(table[rows * 8 + np.tile(
                                                               drawn[i], 2)])
      np.testing.assert_allclose(run(moved, {}, False)[0][i], memory[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field,position_field", [("random_positions", "decoder_position"),
                                                  ("random_encoder_positions",
                                                   "encoder_position")])
def test_random_positions_without_positions_are_an_error(field, position_field):
  with pytest.raises(ValueError, match=f"model.{field}=True needs"):
    ModelConfig(**{field: True, position_field: "none"})
