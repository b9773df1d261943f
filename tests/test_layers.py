"""layers.Dense is nn.Dense with another backward pass: same parameters, values and gradients."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit.models import layers

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_equals_flax_dense_forward_and_backward(shape, use_bias):
  x = jax.random.normal(jax.random.key(0), shape)
  ours = layers.Dense(7, use_bias=use_bias)
  theirs = nn.Dense(7, use_bias=use_bias)
  params = ours.init(jax.random.key(1), x)
  # The same names, shapes and initial values as flax's, so checkpoints carry over.
  chex.assert_trees_all_equal(params, theirs.init(jax.random.key(1), x))
  cotangent = jax.random.normal(jax.random.key(2), shape[:-1] + (7,))

  def loss(module):
    return lambda p, x: jnp.sum(cotangent * module.apply(p, x))
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
  expected = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  if use_bias:
    # The bias's gradient is the cotangent summed over every row.
    np.testing.assert_allclose(got[0]["params"]["bias"],
                               cotangent.reshape(-1, 7).sum(0), rtol=1e-5, atol=1e-6)


def test_dense_computes_in_its_dtype_and_keeps_float32_parameters():
  x = jnp.ones((2, 3, 4))
  dense = layers.Dense(5, dtype=jnp.bfloat16)
  params = dense.init(jax.random.key(0), x)
  chex.assert_type(jax.tree.leaves(params), jnp.float32)
  chex.assert_type(dense.apply(params, x), jnp.bfloat16)
  grads = jax.grad(lambda p: dense.apply(p, x).astype(jnp.float32).sum())(params)
  chex.assert_type(jax.tree.leaves(grads), jnp.float32)
  np.testing.assert_allclose(grads["params"]["bias"], 6.0, rtol=1e-2)


def _bf16(a):
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))


def test_bfloat16_operands_round_every_product_and_accumulate_in_float32():
  """operand_dtype='bfloat16': forward and backward products on operands rounded to bfloat16
  (the cotangent too), sums in float32; parameters and outputs stay float32."""
  x = jax.random.normal(jax.random.key(0), (3, 4, 5))
  dense = layers.Dense(7, operand_dtype=jnp.bfloat16)
  params = dense.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(params, layers.Dense(7).init(jax.random.key(1), x))
  kernel = np.asarray(params["params"]["kernel"])
  bias = np.asarray(params["params"]["bias"])
  cotangent = jax.random.normal(jax.random.key(2), (3, 4, 7))
  y = dense.apply(params, x)
  chex.assert_shape(y, (3, 4, 7))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, _bf16(x) @ _bf16(kernel) + bias, rtol=1e-5, atol=1e-5)
  # Rounding is visible: the float32 product differs by more than float32 noise.
  assert np.abs(np.asarray(y) - (np.asarray(x) @ kernel + bias)).max() > 1e-4

  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(cotangent * dense.apply(p, x)),
                           argnums=(0, 1)))(params, x)
  g, rows_x = _bf16(cotangent).reshape(-1, 7), _bf16(x).reshape(-1, 5)
  np.testing.assert_allclose(grads[1], (g @ _bf16(kernel).T).reshape(3, 4, 5),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads[0]["params"]["kernel"], rows_x.T @ g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads[0]["params"]["bias"], g.sum(0), rtol=1e-5, atol=1e-5)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))


def test_bfloat16_operands_reach_xla_as_bfloat16_products():
  x = jnp.ones((2, 8, 16))

  def products(operand_dtype):
    dense = layers.Dense(32, operand_dtype=operand_dtype)
    params = dense.init(jax.random.key(0), x)
    hlo = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(dense.apply(p, x)), argnums=(0, 1))
                  ).lower(params, x).as_text()
    return [line for line in hlo.splitlines() if "dot_general" in line and "stablehlo" in line]
  assert all("bf16" in line for line in products(jnp.bfloat16)), products(jnp.bfloat16)
  assert not any("bf16" in line for line in products(None))
  assert len(products(jnp.bfloat16)) == len(products(None)) == 3   # y, dx, [dW; db].
