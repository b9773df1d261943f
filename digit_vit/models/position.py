"""Position encodings: sinusoidal and learned (1-D and 2-D for patch grids), and rotary (RoPE).

Additive encodings are added to the token embeddings; RoPE instead rotates queries and keys
inside attention so that q.k depends only on the relative position.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ENCODER_KINDS = ("learned", "learned_2d", "sinusoidal", "sinusoidal_2d", "rope", "none")
DECODER_KINDS = ("learned", "sinusoidal", "rope", "none")


def sinusoidal_table(length: int, dim: int, base: float = 10000.0) -> np.ndarray:
  """The seeds' table: PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(same).

  Returns:
    float32 [length, dim].
  """
  if dim % 2:
    raise ValueError(f"sinusoidal encodings need an even width, got {dim}")
  pos = np.arange(length, dtype=np.float64)[:, None]
  two_i = np.arange(0, dim, 2, dtype=np.float64)[None, :]
  angle = pos / np.power(base, two_i / dim)
  table = np.empty((length, dim), dtype=np.float64)
  table[:, 0::2] = np.sin(angle)
  table[:, 1::2] = np.cos(angle)
  return table.astype(np.float32)


def sinusoidal_table_2d(height: int, width: int, dim: int) -> np.ndarray:
  """2-D form for a patch grid: half the channels encode the row, half the column.

  Returns:
    float32 [height * width, dim], rows of the grid in raster order.
  """
  if dim % 4:
    raise ValueError(f"2-D sinusoidal encodings need a width divisible by 4, got {dim}")
  rows = sinusoidal_table(height, dim // 2)
  cols = sinusoidal_table(width, dim // 2)
  grid = np.concatenate([
      np.repeat(rows[:, None, :], width, axis=1),
      np.repeat(cols[None, :, :], height, axis=0)], axis=-1)
  return grid.reshape(height * width, dim)


def grid_positions(height: int, width: int) -> np.ndarray:
  """int32 [height * width, 2]: (row, column) of each patch in raster order."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(np.int32)


def _rotate_half(x, positions, base):
  """RoPE on the last axis of x [..., t, heads, d] with positions [t] (d even)."""
  dim = x.shape[-1]
  if dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {dim}")
  inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angle = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [t, d/2]
  sin = jnp.sin(angle)[:, None, :]                                       # [t, 1, d/2]
  cos = jnp.cos(angle)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (Su et al., RoFormer).

  Args:
    x: queries or keys [batch, t, heads, head_dim].
    positions: int [t] (sequences) or [t, 2] (patch grids: half of each head rotates by the
      row, half by the column; head_dim must then be divisible by 4).

  Returns:
    x rotated, same shape and dtype.
  """
  positions = jnp.asarray(positions)
  if positions.ndim == 1:
    return _rotate_half(x, positions, base)
  if x.shape[-1] % 4:
    raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {x.shape[-1]}")
  rows, cols = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([_rotate_half(rows, positions[:, 0], base),
                          _rotate_half(cols, positions[:, 1], base)], axis=-1)


class AddPositionEncoding(nn.Module):
  """Adds a position encoding to a sequence of embeddings.

  Attributes:
    kind: 'learned', 'learned_2d', 'sinusoidal', 'sinusoidal_2d', 'rope' or 'none' (the last
      two add nothing here; RoPE acts inside attention).
    max_length: number of positions (the sequence length, or grid height * width).
    grid: (height, width) of the patch grid, for the 2-D kinds.
    decode: add the encoding of the single position at the decode cache index.
  """
  kind: str
  max_length: int
  grid: tuple[int, int] | None = None

  decode: bool = False

  @nn.compact
  def __call__(self, x):
    """x: [batch, length, width] -> same shape with positions added."""
    if self.kind in ("none", "rope"):
      return x
    width = x.shape[-1]
    if self.kind == "learned":
      table = self.param("embedding", nn.initializers.normal(stddev=0.02),
                         (self.max_length, width))
    elif self.kind == "learned_2d":
      height, grid_width = self._grid()
      rows = self.param("row_embedding", nn.initializers.normal(stddev=0.02), (height, width))
      cols = self.param("col_embedding", nn.initializers.normal(stddev=0.02),
                        (grid_width, width))
      table = (rows[:, None, :] + cols[None, :, :]).reshape(height * grid_width, width)
    elif self.kind == "sinusoidal":
      table = jnp.asarray(sinusoidal_table(self.max_length, width))
    elif self.kind == "sinusoidal_2d":
      table = jnp.asarray(sinusoidal_table_2d(*self._grid(), width))
    else:
      raise ValueError(f"unknown position encoding {self.kind!r}; use one of {ENCODER_KINDS}")
    table = table.astype(x.dtype)
    if self.decode:
      index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
      if self.is_initializing() or x.shape[1] != 1:
        return x + table[None, :x.shape[1]]
      step = jax.lax.dynamic_slice_in_dim(table, index.value, 1)
      index.value = index.value + 1
      return x + step[None]
    if x.shape[1] > table.shape[0]:
      raise ValueError(f"sequence of {x.shape[1]} exceeds the {table.shape[0]} positions")
    return x + table[None, :x.shape[1]]

  def _grid(self):
    if self.grid is None:
      raise ValueError(f"position encoding {self.kind!r} needs the patch grid shape")
    return self.grid
