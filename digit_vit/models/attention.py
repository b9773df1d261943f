"""Scaled dot-product attention and multi-head attention with masks, RoPE and a decode cache.

Layout follows `jax.nn.dot_product_attention`: queries [batch, q_len, heads, head_dim],
keys and values [batch, kv_len, heads, head_dim]. Masks are boolean, True where a query may
attend to a key, and broadcast to [batch, heads, q_len, kv_len].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from digit_vit.models import layers, position

IMPLEMENTATIONS = ("xla", "einsum", "custom_vjp", "cudnn")


def causal_mask(length: int) -> jax.Array:
  """bool [1, 1, length, length]: query t may attend to keys 0..t."""
  return jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None, None]


def padding_mask(query_valid: jax.Array | None, key_valid: jax.Array) -> jax.Array:
  """Mask from validity flags.

  Args:
    query_valid: bool [batch, q_len] or None (every query valid).
    key_valid: bool [batch, kv_len].

  Returns:
    bool [batch, 1, q_len or 1, kv_len].
  """
  mask = key_valid[:, None, None, :]
  if query_valid is not None:
    mask = mask & query_valid[:, None, :, None]
  return mask


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the masks that are not None (None if all are)."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  out = present[0]
  for m in present[1:]:
    out = jnp.logical_and(out, m)
  return out


def attention_weights(query, key, mask=None):
  """softmax(q k^T / sqrt(d_k)) over keys, in float32.

  Args:
    query: [batch, q_len, heads, d_k]; key: [batch, kv_len, heads, d_k].
    mask: bool, broadcastable to [batch, heads, q_len, kv_len].

  Returns:
    weights: float32 [batch, heads, q_len, kv_len]; rows with no visible key are all zero.
  """
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  # A large finite number rather than -inf keeps fully masked rows free of NaN (-inf - -inf).
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.where(mask, weights, 0.0)


def _heads_major(x):
  """[batch, length, heads, d] -> [batch, heads, length, d]."""
  return jnp.swapaxes(x, 1, 2)


def _custom_vjp_forward(query, key, value, mask):
  """The forward pass of `custom_vjp_attention`, with what its backward pass needs."""
  q, k, v = _heads_major(query), _heads_major(key), _heads_major(value)
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)   # rows that see no key attend to nothing
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v)
  return _heads_major(out), (q, k, v, weights, out, mask)


def _custom_vjp_backward(residuals, d_out):
  """Gradients of softmax(q k^T * scale) v from its saved weights P and output O.

  dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O)) * scale; dQ = dS K; dK = dS^T Q.
  rowsum(dO * O) equals rowsum(P * dP) (FlashAttention's identity), a [q, d] product instead of
  the softmax's own [q, k] Jacobian-vector product that autodiff would build.
  """
  q, k, v, weights, out, mask = residuals
  d_out = _heads_major(d_out)
  d_value = jnp.einsum("bhqk,bhqd->bhkd", weights.astype(d_out.dtype), d_out)
  d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, v).astype(jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (weights * (d_weights - row) * q.shape[-1] ** -0.5).astype(q.dtype)
  d_query = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k)
  d_key = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q)
  return _heads_major(d_query), _heads_major(d_key), _heads_major(d_value), None


@jax.custom_vjp
def custom_vjp_attention(query, key, value, mask=None):
  """softmax(Q K^T / sqrt(d_k)) V in heads-major layout, with a hand-written backward pass.

  The same function as `jax.nn.dot_product_attention`, arranged for XLA's CPU backend: the
  batched products run on [batch, heads, length, d] operands (contiguous per head), and the
  backward pass reuses the saved weights and output instead of differentiating the softmax.
  On the bench config it made evaluation and cached decoding about 10% faster than
  `jax.nn.dot_product_attention` and the train step no slower (docs/performance.md).

  Args:
    query: [batch, q_len, heads, d]; key and value: [batch, kv_len, heads, d].
    mask: bool broadcastable to [batch, heads, q_len, kv_len], or None.

  Returns:
    [batch, q_len, heads, d]; rows with no visible key are zero.
  """
  return _custom_vjp_forward(query, key, value, mask)[0]


custom_vjp_attention.defvjp(_custom_vjp_forward, _custom_vjp_backward)


def _check_cudnn(query):
  """cuDNN's fused attention raises deep inside XLA where it cannot run; say why up front."""
  backend = jax.default_backend()
  if backend != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU, but JAX runs on {backend!r}; "
                     "use model.attention_impl='custom_vjp' or 'xla' here")
  if query.dtype not in (jnp.bfloat16, jnp.float16) or query.shape[-1] % 8:
    raise ValueError(f"attention_impl='cudnn' needs bfloat16/float16 and a head dim that is a "
                     f"multiple of 8, got {query.dtype} and {query.shape[-1]}; set "
                     "model.dtype='bfloat16' or model.attention_impl='custom_vjp'")


def dot_product_attention(query, key, value, mask=None, *, implementation: str = "xla",
                          dropout_rate: float = 0.0, dropout_rng=None,
                          deterministic: bool = True):
  """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.

  Args:
    query: [batch, q_len, heads, d_k].
    key: [batch, kv_len, heads, d_k].
    value: [batch, kv_len, heads, d_v].
    mask: bool broadcastable to [batch, heads, q_len, kv_len]; True = may attend.
    implementation: 'xla' (jax.nn.dot_product_attention), 'einsum' (written out; supports
      d_v != d_k and attention dropout), 'custom_vjp' (`custom_vjp_attention`, the fastest
      here on CPU), or 'cudnn' (GPU flash attention, bf16/fp16 only).
    dropout_rate, dropout_rng, deterministic: dropout on the attention weights (einsum only).

  Returns:
    [batch, q_len, heads, d_v]. Query rows with no visible key give zeros, never NaN.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  use_dropout = dropout_rate > 0.0 and not deterministic
  if implementation != "einsum":
    if value.shape[-1] != query.shape[-1]:
      raise ValueError(
          f"attention implementation {implementation!r} needs equal query and value head "
          f"dims, got {query.shape[-1]} and {value.shape[-1]}; use implementation='einsum'")
    if use_dropout:
      raise ValueError(
          f"attention dropout is only implemented by 'einsum', not {implementation!r}; set "
          "model.attention_dropout_rate=0 or model.attention_impl='einsum'")
    if implementation == "custom_vjp":
      # Its weights are zero where masked, so rows that see no key are zero already.
      return custom_vjp_attention(query, key, value, mask).astype(value.dtype)
    if implementation == "cudnn":
      _check_cudnn(query)
    if mask is not None:
      mask = jnp.broadcast_to(
          mask, (query.shape[0], mask.shape[1], query.shape[1], key.shape[1]))
    out = jax.nn.dot_product_attention(query, key, value, mask=mask,
                                       implementation=implementation)
  else:
    weights = attention_weights(query, key, mask)
    if use_dropout:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
      weights = weights * keep / (1.0 - dropout_rate)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
  if mask is not None:
    # Rows that see no key: the softmax of -big logits is uniform, not "no information".
    any_visible = jnp.any(mask, axis=-1)                     # [b|1, h|1, q]
    any_visible = jnp.moveaxis(any_visible, 1, 2)[..., None]  # [b|1, q, h|1, 1]
    out = jnp.where(any_visible, out, 0.0)
  return out.astype(value.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head attention: project, split into heads, attend, concatenate, project back.

  Self-attention (no `inputs_kv`) uses one fused QKV projection; cross-attention projects
  the queries and a fused KV. With `num_heads=1` this is the seeds' single-head attention
  (Q = E W_q, K = E W_k, V = E W_v, H = softmax(Q K^T / sqrt(d_k)) V, out = H W_o).

  Attributes:
    num_heads: number of heads.
    qk_dim: total width of queries and keys over all heads (default: input width).
    v_dim: total width of values over all heads (default: qk_dim).
    out_dim: output width (default: input width).
    implementation: see `dot_product_attention`.
    dropout_rate: dropout on attention weights.
    rope: rotate queries and keys by their positions (self-attention only).
    rope_grid: whether RoPE positions are (row, column) pairs (`position.apply_rope`'s
      `grid`); None infers it from their rank, so per-example sequence positions [batch, t]
      need False.
    decode: keep keys and values of past steps in the 'cache' collection and attend one new
      query at a time; in cross-attention, project the memory once and reuse it, and keep the
      memory's mask, if the sizing call had one, for every later step.
    dtype: compute dtype; parameters stay `param_dtype`.
    matmul_dtype: the projections' operand dtype (`layers.Dense.operand_dtype`; None: the
      compute dtype).
  """
  num_heads: int
  qk_dim: int | None = None
  v_dim: int | None = None
  out_dim: int | None = None
  implementation: str = "xla"
  dropout_rate: float = 0.0
  rope: bool = False
  rope_grid: bool | None = None
  decode: bool = False
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  matmul_dtype: Any = None

  def _head_dims(self, width):
    qk_dim = self.qk_dim or width
    v_dim = self.v_dim or qk_dim
    for name, dim in (("qk_dim", qk_dim), ("v_dim", v_dim)):
      if dim % self.num_heads:
        raise ValueError(f"{name}={dim} is not divisible by num_heads={self.num_heads}")
    return qk_dim, v_dim

  def _dense(self, features, name):
    return layers.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, operand_dtype=self.matmul_dtype, name=name,
                        kernel_init=nn.initializers.xavier_uniform())

  def _split(self, x):
    return x.reshape(x.shape[:-1] + (self.num_heads, x.shape[-1] // self.num_heads))

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None, *, positions=None,
               deterministic: bool = True, return_weights: bool = False):
    """Attends `inputs_q` to `inputs_kv` (itself when None).

    Args:
      inputs_q: [batch, q_len, width].
      inputs_kv: [batch, kv_len, kv_width] for cross-attention, or None.
      mask: bool broadcastable to [batch, heads, q_len, kv_len]. In decode mode the cache
        adds its own causal mask (self-attention) or the memory mask it was sized with
        (cross-attention), ANDed with this one.
      positions: RoPE positions: int [q_len] or [batch, q_len] (sequences), [q_len, 2] or
        [batch, q_len, 2] (2-D grids); None = 0..q_len-1; in decode mode the cache index is
        used.
      deterministic: disables dropout.
      return_weights: also return the attention weights [batch, heads, q_len, kv_len]
        (computed the einsum way, for attention maps).

    Returns:
      [batch, q_len, out_dim], and the weights if asked.
    """
    width = inputs_q.shape[-1]
    qk_dim, v_dim = self._head_dims(width)
    out_dim = self.out_dim or width
    is_self = inputs_kv is None

    if is_self:
      qkv = self._dense(2 * qk_dim + v_dim, "qkv")(inputs_q)
      query, key, value = jnp.split(qkv, [qk_dim, 2 * qk_dim], axis=-1)
      query, key, value = self._split(query), self._split(key), self._split(value)
      if self.decode:
        query, key, value, mask, positions = self._self_attention_cache(
            query, key, value, mask, positions)
      elif self.rope:
        query, key = self._rotate(query, key, positions)
    else:
      if self.rope:
        raise ValueError("RoPE applies to self-attention only, not cross-attention")
      query = self._split(self._dense(qk_dim, "q")(inputs_q))
      key, value, mask = self._cross_attention_kv(inputs_kv, qk_dim, v_dim, mask)

    dropout_rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      dropout_rng = self.make_rng("dropout")
    weights = None
    if return_weights:
      weights = attention_weights(query, key, mask)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
    else:
      out = dot_product_attention(
          query, key, value, mask, implementation=self.implementation,
          dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
          deterministic=deterministic)
    out = out.reshape(out.shape[:-2] + (v_dim,))
    out = self._dense(out_dim, "out")(out)
    return (out, weights) if return_weights else out

  def _rotate(self, query, key, positions):
    if positions is None:
      positions = jnp.arange(query.shape[1])
    return (position.apply_rope(query, positions, grid=self.rope_grid),
            position.apply_rope(key, positions, grid=self.rope_grid))

  def _cross_attention_kv(self, inputs_kv, qk_dim, v_dim, mask):
    """Projects the memory into keys and values; in decode mode once per image, into the
    cache, so each decode step only projects its one new query. The sizing call's mask (the
    memory's padding) is cached with them, so the steps need not pass it again.

    Returns:
      key, value [batch, kv_len, heads, d] and the mask to attend with.
    """
    project = self._dense(qk_dim + v_dim, "kv")
    if self.decode and self.has_variable("cache", "cross_key"):
      if self.has_variable("cache", "cross_mask"):
        mask = combine_masks(self.get_variable("cache", "cross_mask"), mask)
      return (self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value"),
              mask)
    key, value = jnp.split(project(inputs_kv), [qk_dim], axis=-1)
    key, value = self._split(key), self._split(value)
    if self.decode:
      self.put_variable("cache", "cross_key", key)
      self.put_variable("cache", "cross_value", value)
      if mask is not None:
        self.put_variable("cache", "cross_mask", mask)
    return key, value, mask

  def _self_attention_cache(self, query, key, value, mask, positions):
    """One decode step: write this step's key and value at the cache index, attend to all
    filled slots. The first call (cache not yet made) sizes the cache from its inputs."""
    is_initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      # Sizing call: behave like the full (teacher-forced) pass.
      if self.rope:
        query, key = self._rotate(query, key, positions)
      return query, key, value, mask, positions
    batch, steps, heads, _ = query.shape
    max_length = cached_key.value.shape[1]
    if steps != 1:
      raise ValueError(f"decode mode takes one token per call, got {steps}")
    index = cache_index.value
    if self.rope:
      step_position = jnp.reshape(index, (1,))
      query = position.apply_rope(query, step_position)
      key = position.apply_rope(key, step_position)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value, (0, index, 0, 0))
    cache_index.value = index + 1
    step_mask = (jnp.arange(max_length) <= index)[None, None, None, :]
    mask = combine_masks(step_mask, mask)
    return query, cached_key.value, cached_value.value, mask, positions
