"""Attention: the formula, masks, heads, and the seeds' single-head worked example."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit.models import attention
from digit_vit.models.attention import MultiHeadAttention

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count

IMPLS = ["xla", "einsum", "custom_vjp"]


def _numpy_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(d)) v for one head, q [t, d], k [s, d], v [s, dv]."""
  logits = q @ k.T / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  return w @ v


def _qkv(rng=0, b=2, t=5, s=7, h=3, d=8):
  keys = jax.random.split(jax.random.key(rng), 3)
  return (jax.random.normal(keys[0], (b, t, h, d)), jax.random.normal(keys[1], (b, s, h, d)),
          jax.random.normal(keys[2], (b, s, h, d)))


@pytest.mark.parametrize("impl", IMPLS)
def test_dot_product_attention_matches_numpy(impl):
  q, k, v = _qkv()
  out = attention.dot_product_attention(q, k, v, implementation=impl)
  chex.assert_shape(out, (2, 5, 3, 8))
  for b in range(2):
    for h in range(3):
      expected = _numpy_attention(np.asarray(q[b, :, h]), np.asarray(k[b, :, h]),
                                  np.asarray(v[b, :, h]))
      np.testing.assert_allclose(out[b, :, h], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_attention_matches_numpy(impl):
  q, k, v = _qkv(t=4, s=4)
  key_valid = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  mask = attention.combine_masks(attention.causal_mask(4),
                                 attention.padding_mask(None, key_valid))
  chex.assert_shape(mask, (2, 1, 4, 4))
  out = attention.dot_product_attention(q, k, v, mask, implementation=impl)
  for b in range(2):
    m = np.asarray(mask[b, 0])
    expected = _numpy_attention(np.asarray(q[b, :, 0]), np.asarray(k[b, :, 0]),
                                np.asarray(v[b, :, 0]), m)
    np.testing.assert_allclose(out[b, :, 0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_row_is_finite_and_zero(impl):
  q, k, v = _qkv(t=3, s=4)
  query_valid = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
  key_valid = jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)
  out = attention.dot_product_attention(
      q, k, v, attention.padding_mask(query_valid, key_valid), implementation=impl)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(out[0, 2], 0.0)   # padded query
  np.testing.assert_array_equal(out[1], 0.0)      # no valid key at all


def test_fully_masked_row_has_finite_gradient():
  q, k, v = _qkv(t=2, s=3)
  mask = jnp.zeros((2, 1, 2, 3), bool)
  grads = jax.grad(lambda q: attention.dot_product_attention(
      q, k, v, mask, implementation="einsum").sum())(q)
  assert np.isfinite(np.asarray(grads)).all()


def test_implementations_agree():
  q, k, v = _qkv()
  mask = jax.random.bernoulli(jax.random.key(9), 0.7, (2, 1, 5, 7))
  a = attention.dot_product_attention(q, k, v, mask, implementation="xla")
  for impl in ("einsum", "custom_vjp"):
    b = attention.dot_product_attention(q, k, v, mask, implementation=impl)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_custom_vjp_gradients_equal_autodiff(masked):
  # The hand-written backward pass against autodiff of the written-out attention, with a
  # cotangent that is not all ones and (masked) a row that sees no key at all.
  q, k, v = _qkv(b=2, t=5, s=7, h=3, d=8)
  mask = None
  if masked:
    mask = jax.random.bernoulli(jax.random.key(4), 0.6, (2, 1, 5, 7)).at[1, 0, 2].set(False)
  cotangent = jax.random.normal(jax.random.key(5), q.shape)

  def loss(impl):
    return lambda q, k, v: jnp.sum(cotangent * attention.dot_product_attention(
        q, k, v, mask, implementation=impl))
  expected = jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss("custom_vjp"), argnums=(0, 1, 2)))(q, k, v)
  for name, g, e in zip("qkv", got, expected):
    chex.assert_shape(g, e.shape)
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
  if masked:
    np.testing.assert_array_equal(got[0][1, 2], 0.0)   # a query that sees nothing learns nothing
    assert np.abs(np.asarray(got[0])).sum() > 0


def test_custom_vjp_in_bfloat16_keeps_the_dtype_and_the_values():
  q, k, v = _qkv()
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = attention.dot_product_attention(*low, implementation="custom_vjp")
  chex.assert_type(out, jnp.bfloat16)
  reference = attention.dot_product_attention(q, k, v, implementation="einsum")
  np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=5e-2)
  grads = jax.grad(lambda q: attention.dot_product_attention(
      q, *low[1:], implementation="custom_vjp").astype(jnp.float32).sum())(low[0])
  chex.assert_type(grads, jnp.bfloat16)
  assert np.isfinite(np.asarray(grads, np.float32)).all()


def test_cudnn_off_gpu_or_in_float32_says_what_to_change(monkeypatch):
  q, k, v = _qkv(d=8)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU.*custom_vjp"):
      attention.dot_product_attention(q, k, v, implementation="cudnn")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="bfloat16.*model.dtype='bfloat16'"):
    attention.dot_product_attention(q, k, v, implementation="cudnn")


def test_unknown_implementation_and_mismatched_dims_are_errors():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="not one of"):
    attention.dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="einsum"):
    attention.dot_product_attention(q, k, v[..., :4], implementation="xla")


def test_seeds_single_head_worked_example():
  """16 tokens of width 64; W_q, W_k 64x24; W_v 64x32; W_o 32x64; output 16x64."""
  x = jax.random.normal(jax.random.key(0), (1, 16, 64))
  layer = MultiHeadAttention(num_heads=1, qk_dim=24, v_dim=32, implementation="einsum")
  params = layer.init(jax.random.key(1), x)["params"]
  chex.assert_shape(params["qkv"]["kernel"], (64, 24 + 24 + 32))
  chex.assert_shape(params["out"]["kernel"], (32, 64))
  out = layer.apply({"params": params}, x)
  chex.assert_shape(out, (1, 16, 64))
  chex.assert_type(out, jnp.float32)

  # By hand: Q = E W_q, K = E W_k, V = E W_v, H = softmax(Q K^T / sqrt(24)) V, out = H W_o.
  e = np.asarray(x[0], np.float64)
  kernel, bias = np.asarray(params["qkv"]["kernel"]), np.asarray(params["qkv"]["bias"])
  w_q, w_k, w_v = kernel[:, :24], kernel[:, 24:48], kernel[:, 48:]
  b_q, b_k, b_v = bias[:24], bias[24:48], bias[48:]
  q, k, v = e @ w_q + b_q, e @ w_k + b_k, e @ w_v + b_v
  assert (q.shape, k.shape, v.shape) == ((16, 24), (16, 24), (16, 32))
  h = _numpy_attention(q, k, v)
  expected = h @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
  np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_head_is_heads_concatenated_and_projected(impl):
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  layer = MultiHeadAttention(num_heads=4, implementation=impl)
  params = layer.init(jax.random.key(1), x)["params"]
  out = layer.apply({"params": params}, x)
  chex.assert_shape(out, (2, 6, 32))
  qkv = np.asarray(x) @ np.asarray(params["qkv"]["kernel"]) + np.asarray(params["qkv"]["bias"])
  q, k, v = np.split(qkv, 3, axis=-1)
  heads = []
  for h in range(4):
    sl = slice(8 * h, 8 * (h + 1))
    heads.append(np.stack([_numpy_attention(q[b, :, sl], k[b, :, sl], v[b, :, sl])
                           for b in range(2)]))
  concat = np.concatenate(heads, axis=-1)
  expected = concat @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_mask_hides_the_future(impl):
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  layer = MultiHeadAttention(num_heads=2, implementation=impl)
  params = layer.init(jax.random.key(1), x)
  mask = attention.causal_mask(8)
  base = layer.apply(params, x, mask=mask)
  for t in range(7):
    changed = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(t), (2, 7 - t, 16)))
    out = layer.apply(params, changed, mask=mask)
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_mask_ignores_padded_keys(impl):
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  memory = jax.random.normal(jax.random.key(1), (2, 6, 16))
  key_valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
  layer = MultiHeadAttention(num_heads=2, implementation=impl)
  params = layer.init(jax.random.key(2), x, memory)
  mask = attention.padding_mask(None, key_valid)
  base = layer.apply(params, x, memory, mask=mask)
  noise = jax.random.normal(jax.random.key(3), memory.shape) * 10
  changed = jnp.where(key_valid[:, :, None], memory, noise)
  np.testing.assert_allclose(layer.apply(params, x, changed, mask=mask), base,
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(layer.apply(params, x, changed), base)  # without the mask it matters


def test_heads_must_divide_width():
  x = jnp.zeros((1, 4, 30))
  with pytest.raises(ValueError, match="divisible by num_heads"):
    MultiHeadAttention(num_heads=4).init(jax.random.key(0), x)
