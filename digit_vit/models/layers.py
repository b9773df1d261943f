"""Dense with the parameters of `flax.linen.Dense` and a backward pass that is faster on CPU.

The gradient of a bias sums the incoming gradient over every row (batch x tokens). XLA's CPU
backend lowers that sum over the leading axes to a strided reduce-window, which ran 17x
slower than a matrix-vector product on a [128 x 96, 512] gradient here (7.5 ms against
0.45 ms); such sums were about a sixth of the bench train step. Written as a separate product
the sum made XLA transpose the gradient for it instead. `affine` gets the bias's gradient from
the kernel's own product, [x, 1]^T g, which the step computes anyway: the bench train step went
from 164 to 211 images/s (docs/performance.md). Parameter names, shapes and
initialisers are `nn.Dense`'s, so checkpoints and parameter counts are unchanged.

`operand_dtype='bfloat16'` rounds the operands of every product, forward and backward, to
bfloat16 and accumulates in the compute dtype (as TPUs treat float32 matmuls by default); the
sums, activations and parameters stay float32. CPUs with AMX or AVX-512 BF16 run such products
several times faster than float32 ones, given YNNPACK's dots (`xla_options`; docs/performance.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def project(x, kernel, operand_dtype=None):
  """x: [..., in_features], kernel: [in_features, features] -> x @ kernel: [..., features].

  operand_dtype: round both operands to it (None: keep them) and accumulate in x's dtype."""
  return _product(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), operand_dtype)


def _product(a, b, dimensions, operand_dtype):
  """dot_general(a, b) in a's dtype, on operands rounded to `operand_dtype` when given."""
  if operand_dtype is None or operand_dtype == a.dtype:
    return jax.lax.dot_general(a, b, dimensions)
  return jax.lax.dot_general(a.astype(operand_dtype), b.astype(operand_dtype), dimensions,
                             preferred_element_type=a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def affine(x, kernel, bias, operand_dtype=None):
  """project(x, kernel, operand_dtype) + bias: [..., features], bias: [features]."""
  return project(x, kernel, operand_dtype) + bias


def _affine_forward(x, kernel, bias, operand_dtype):
  return affine(x, kernel, bias, operand_dtype), (x, kernel)


def _affine_backward(operand_dtype, residuals, gradient):
  x, kernel = residuals
  rows_x = x.reshape(-1, x.shape[-1])
  rows_g = gradient.reshape(-1, gradient.shape[-1])
  d_x = _product(gradient, kernel, (((gradient.ndim - 1,), (1,)), ((), ())), operand_dtype)
  # One product gives the kernel's and the bias's gradients: [x, 1]^T g.
  ones = jnp.ones((rows_x.shape[0], 1), rows_x.dtype)
  d_both = _product(jnp.concatenate([rows_x, ones], axis=1), rows_g, (((0,), (0,)), ((), ())),
                    operand_dtype)
  return d_x, d_both[:-1], d_both[-1]


affine.defvjp(_affine_forward, _affine_backward)


class Dense(nn.Module):
  """y = x @ kernel + bias over the last axis, like `nn.Dense`.

  Attributes:
    features: output width.
    use_bias: add a bias.
    dtype: compute dtype (None: that of the inputs and parameters, promoted).
    param_dtype: parameter dtype.
    operand_dtype: the products' operand dtype (None: the compute dtype), see the module's
      docstring.
    kernel_init, bias_init: initialisers (flax's defaults).
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  operand_dtype: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    """x: [..., in_features] -> [..., features]."""
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if bias is not None:
      return affine(x, kernel, bias, self.operand_dtype)
    return project(x, kernel, self.operand_dtype)
