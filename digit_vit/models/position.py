"""Position encodings: sinusoidal and learned (1-D and 2-D for patch grids), and rotary (RoPE).

Additive encodings are added to the token embeddings; RoPE instead rotates queries and keys
inside attention so that q.k depends only on the relative position.

Every kind can be read at explicit positions (`AddPositionEncoding(...)(x, positions)`,
`apply_rope(x, positions)`), shared by the batch or one row per example. The encoder uses that
for images narrower than the widest grid (their patches keep the (row, column) entries they
have in a wide image), and both encoder and decoder for randomized positions (Ruoss et al.,
"Randomized Positional Encodings Boost Length Generalization of Transformers", ACL 2023):
in training each sequence takes a sorted random subset of all the positions the model has
(`random_sorted_positions`), so every entry of a table is trained although training lines use
only its first ones, and the relative order the model learns is kept.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The rng stream that randomized positions draw from in training; without one they draw from
# 'dropout', which every training step already provides (`positions_rng`).
RNG_STREAM = "positions"

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


def random_sorted_positions(rng, batch: int, length: int, max_length: int) -> jax.Array:
  """Randomized positions (Ruoss et al. 2023): per row, `length` distinct positions drawn
  uniformly from range(max_length), in increasing order.

  Returns:
    int32 [batch, length].
  """
  if not 0 < length <= max_length:
    raise ValueError(f"cannot draw {length} distinct positions from range({max_length})")
  noise = jax.random.uniform(rng, (batch, max_length))
  _, chosen = jax.lax.top_k(noise, length)  # A uniform random subset, in random order.
  return jnp.sort(chosen, axis=-1).astype(jnp.int32)


def positions_rng(module: nn.Module) -> jax.Array:
  """A key for randomized positions: from the 'positions' rng stream if the caller gave one,
  else from 'dropout' (a fresh key of that stream, so dropout masks are unaffected)."""
  for stream in (RNG_STREAM, "dropout"):
    if module.has_rng(stream):
      return module.make_rng(stream)
  raise ValueError(
      "randomized positions (model.random_positions / model.random_encoder_positions) need an "
      f"rng in training: pass rngs={{'{RNG_STREAM}': key}} or {{'dropout': key}} to apply, or "
      "train=False")


def _rotate_half(x, positions, base):
  """RoPE on the last axis of x [batch, t, heads, d] with positions [t] or [batch, t] (d even)."""
  dim = x.shape[-1]
  if dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {dim}")
  inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angle = positions.astype(jnp.float32)[..., None] * inv_freq      # [(batch,) t, d/2]
  sin = jnp.sin(angle)[..., None, :]                                 # [(batch,) t, 1, d/2]
  cos = jnp.cos(angle)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0, *,
               grid: bool | None = None) -> jax.Array:
  """Rotary position embedding (Su et al., RoFormer).

  Args:
    x: queries or keys [batch, t, heads, head_dim].
    positions: int [t] or [batch, t] (sequences), or [t, 2] or [batch, t, 2] (patch grids:
      half of each head rotates by the row, half by the column; head_dim must then be
      divisible by 4). Positions may go past any length seen in training: the rotation is
      defined for every integer.
    grid: whether `positions` are (row, column) pairs; None infers it from their rank
      (1: a sequence, 2 or 3: a grid), so per-example sequence positions [batch, t] need
      grid=False.

  Returns:
    x rotated, same shape and dtype.
  """
  positions = jnp.asarray(positions)
  if grid is None:
    grid = positions.ndim >= 2
  if not grid:
    return _rotate_half(x, positions, base)
  if x.shape[-1] % 4:
    raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {x.shape[-1]}")
  rows, cols = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([_rotate_half(rows, positions[..., 0], base),
                          _rotate_half(cols, positions[..., 1], base)], axis=-1)


class AddPositionEncoding(nn.Module):
  """Adds a position encoding to a sequence of embeddings.

  Attributes:
    kind: 'learned', 'learned_2d', 'sinusoidal', 'sinusoidal_2d', 'rope' or 'none' (the last
      two add nothing here; RoPE acts inside attention).
    max_length: number of positions (the sequence length, or grid height * width): the size of
      a 1-D table.
    grid: (height, width) of the widest patch grid, for the 2-D kinds (their row and column
      tables) and for indexing a 1-D table by (row, column).
    decode: add the encoding of the single position at the decode cache index.
  """
  kind: str
  max_length: int
  grid: tuple[int, int] | None = None

  decode: bool = False

  @nn.compact
  def __call__(self, x, positions=None):
    """Args:
      x: [batch, length, width].
      positions: None for positions 0..length-1 (raster order of the whole grid for the 2-D
        kinds); else int, shared [length] or per example [batch, length] indices into the 1-D
        table, or (row, column) pairs [length, 2] / [batch, length, 2] for the 2-D kinds.

    Returns:
      x with positions added, same shape.
    """
    if self.kind in ("none", "rope"):
      return x
    if self.kind not in ("learned", "learned_2d", "sinusoidal", "sinusoidal_2d"):
      raise ValueError(f"unknown position encoding {self.kind!r}; use one of {ENCODER_KINDS}")
    width = x.shape[-1]
    if self.kind in ("learned_2d", "sinusoidal_2d"):
      rows, cols = self._axis_tables(width)
      if positions is None:  # The whole grid in raster order.
        if self.kind == "learned_2d":
          table = (rows[:, None, :] + cols[None, :, :]).reshape(-1, width)
        else:
          table = jnp.asarray(sinusoidal_table_2d(*self.grid, width))
      else:
        positions = jnp.asarray(positions)
        row_part, col_part = rows[positions[..., 0]], cols[positions[..., 1]]
        if self.kind == "learned_2d":
          return x + (row_part + col_part).astype(x.dtype)
        return x + jnp.concatenate([row_part, col_part], axis=-1).astype(x.dtype)
    elif self.kind == "learned":
      table = self.param("embedding", nn.initializers.normal(stddev=0.02),
                         (self.max_length, width))
    else:
      table = jnp.asarray(sinusoidal_table(self.max_length, width))
    table = table.astype(x.dtype)
    if self.decode:
      index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
      if self.is_initializing() or x.shape[1] != 1:
        return x + table[None, :x.shape[1]]
      step = jax.lax.dynamic_slice_in_dim(table, index.value, 1)
      index.value = index.value + 1
      return x + step[None]
    if positions is not None:
      return x + table[jnp.asarray(positions)]  # [length] or [batch, length] rows of the table.
    if x.shape[1] > table.shape[0]:
      raise ValueError(f"sequence of {x.shape[1]} exceeds the {table.shape[0]} positions")
    return x + table[None, :x.shape[1]]

  def _axis_tables(self, width):
    """The row table [height, w] and the column table [grid width, w] of a 2-D kind: learned
    (summed) with w = width, or sinusoidal (concatenated) with w = width / 2."""
    if self.grid is None:
      raise ValueError(f"position encoding {self.kind!r} needs the patch grid shape")
    height, grid_width = self.grid
    if self.kind == "learned_2d":
      rows = self.param("row_embedding", nn.initializers.normal(stddev=0.02), (height, width))
      cols = self.param("col_embedding", nn.initializers.normal(stddev=0.02),
                        (grid_width, width))
      return rows, cols
    if width % 4:
      raise ValueError(f"2-D sinusoidal encodings need a width divisible by 4, got {width}")
    return (jnp.asarray(sinusoidal_table(height, width // 2)),
            jnp.asarray(sinusoidal_table(grid_width, width // 2)))
