"""Position encodings: the seeds' sinusoid formula, 2-D grids, learned tables, RoPE."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit.models import position

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count


def test_sinusoidal_table_is_the_seeds_formula():
  length, dim = 12, 8
  table = position.sinusoidal_table(length, dim)
  chex.assert_shape(table, (length, dim))
  for pos in range(length):
    for i in range(dim // 2):
      angle = pos / 10000 ** (2 * i / dim)
      assert table[pos, 2 * i] == pytest.approx(np.sin(angle), abs=1e-6)
      assert table[pos, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-6)
  # The seeds' d_k = 4 example: position 0 is [sin 0, cos 0, sin 0, cos 0].
  np.testing.assert_allclose(position.sinusoidal_table(3, 4)[0], [0, 1, 0, 1])


def test_sinusoidal_2d_encodes_row_then_column():
  table = position.sinusoidal_table_2d(3, 5, 8)
  chex.assert_shape(table, (15, 8))
  rows, cols = position.sinusoidal_table(3, 4), position.sinusoidal_table(5, 4)
  np.testing.assert_allclose(table[1 * 5 + 2], np.concatenate([rows[1], cols[2]]))


def test_odd_width_is_rejected():
  with pytest.raises(ValueError, match="even"):
    position.sinusoidal_table(4, 7)


@pytest.mark.parametrize("kind,grid,params", [
    ("learned", None, {"embedding": (6, 16)}),
    ("learned_2d", (2, 3), {"row_embedding": (2, 16), "col_embedding": (3, 16)}),
    ("sinusoidal", None, {}), ("sinusoidal_2d", (2, 3), {}), ("rope", None, {}),
    ("none", None, {}),
])
def test_add_position_encoding_shapes(kind, grid, params):
  x = jnp.zeros((2, 6, 16))
  layer = position.AddPositionEncoding(kind, 6, grid)
  variables = layer.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables.get("params", {})) == params
  out = layer.apply(variables, x)
  chex.assert_shape(out, (2, 6, 16))
  if kind in ("rope", "none"):
    np.testing.assert_array_equal(out, x)
  elif kind == "sinusoidal":
    np.testing.assert_allclose(out[0], position.sinusoidal_table(6, 16))


def _q_dot_k(query_pos, key_pos, q, k):
  rq = position.apply_rope(q[None, None, None], jnp.array([query_pos]))[0, 0, 0]
  rk = position.apply_rope(k[None, None, None], jnp.array([key_pos]))[0, 0, 0]
  return float(rq @ rk)


def test_rope_dot_product_depends_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(0), (2, 16))
  for offset in (0, 1, 5):
    values = [_q_dot_k(p + offset, p, q, k) for p in (0, 3, 11, 40)]
    np.testing.assert_allclose(values, values[0], rtol=1e-4, atol=1e-4)
  assert abs(_q_dot_k(5, 0, q, k) - _q_dot_k(0, 0, q, k)) > 1e-3


def test_rope_keeps_norms_and_position_zero_is_identity():
  x = jax.random.normal(jax.random.key(0), (2, 7, 3, 8))
  rotated = position.apply_rope(x, jnp.arange(7))
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  np.testing.assert_allclose(rotated[:, 0], x[:, 0], rtol=1e-6)


def test_rope_2d_is_relative_in_rows_and_columns():
  q, k = jax.random.normal(jax.random.key(1), (2, 16))

  def dot(qp, kp):
    rq = position.apply_rope(q[None, None, None], jnp.array([qp]))[0, 0, 0]
    rk = position.apply_rope(k[None, None, None], jnp.array([kp]))[0, 0, 0]
    return float(rq @ rk)

  np.testing.assert_allclose(dot((2, 7), (1, 3)), dot((5, 10), (4, 6)), rtol=1e-4)
  np.testing.assert_array_equal(position.grid_positions(2, 3),
                                [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])


# ---- Explicit and randomized positions; positions past the training range


def test_random_sorted_positions_are_distinct_sorted_in_range_and_random():
  draws = np.asarray(position.random_sorted_positions(jax.random.key(0), 200, 5, 33))
  chex.assert_shape(draws, (200, 5))
  assert draws.dtype == np.int32
  assert (np.diff(draws, axis=1) > 0).all()  # Sorted, hence distinct.
  assert draws.min() >= 0 and draws.max() < 33
  assert len(np.unique(draws)) == 33  # Every position gets drawn (P(miss) ~ 1e-13).
  assert len({tuple(row) for row in draws}) > 150
  other = np.asarray(position.random_sorted_positions(jax.random.key(1), 200, 5, 33))
  assert not np.array_equal(draws, other)
  np.testing.assert_array_equal(  # All of them: 0..t-1.
      position.random_sorted_positions(jax.random.key(0), 2, 7, 7), [list(range(7))] * 2)
  with pytest.raises(ValueError, match="cannot draw 8 distinct positions"):
    position.random_sorted_positions(jax.random.key(0), 1, 8, 7)


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_1d_encodings_at_explicit_positions_are_those_table_rows(kind):
  x = jax.random.normal(jax.random.key(0), (2, 4, 16))
  layer = position.AddPositionEncoding(kind, 10)
  variables = layer.init(jax.random.key(1), jnp.zeros((1, 10, 16)))
  table = np.asarray(layer.apply(variables, jnp.zeros((1, 10, 16)))[0])  # Rows 0..9.
  shared = jnp.array([0, 3, 4, 9])
  np.testing.assert_allclose(layer.apply(variables, x, shared), x + table[[0, 3, 4, 9]],
                             rtol=1e-6, atol=1e-6)
  per_example = jnp.array([[0, 3, 4, 9], [1, 2, 7, 8]])
  np.testing.assert_allclose(layer.apply(variables, x, per_example),
                             x + table[np.asarray(per_example)], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["learned_2d", "sinusoidal_2d"])
def test_2d_encodings_at_explicit_cells_are_those_of_the_whole_grid(kind):
  layer = position.AddPositionEncoding(kind, 12, (2, 6))
  variables = layer.init(jax.random.key(1), jnp.zeros((1, 12, 16)))
  grid = np.asarray(layer.apply(variables, jnp.zeros((1, 12, 16)))[0])  # Raster order.
  cells = position.grid_positions(2, 3)  # A grid half as wide: its (row, col) entries.
  out = layer.apply(variables, jnp.zeros((1, 6, 16)), jnp.asarray(cells))
  np.testing.assert_allclose(out[0], grid[cells[:, 0] * 6 + cells[:, 1]], rtol=1e-6, atol=1e-6)
  per_example = jnp.array([[[0, 1], [1, 5]], [[1, 0], [0, 4]]])
  out = layer.apply(variables, jnp.zeros((2, 2, 16)), per_example)
  cells = np.asarray(per_example)
  np.testing.assert_allclose(out, grid[cells[..., 0] * 6 + cells[..., 1]], rtol=1e-6,
                             atol=1e-6)


def test_rope_with_per_example_positions_rotates_each_row_by_its_own():
  x = jax.random.normal(jax.random.key(0), (2, 3, 2, 8))
  seq = jnp.array([[0, 1, 2], [2, 5, 30]])
  got = position.apply_rope(x, seq, grid=False)
  for b in range(2):
    np.testing.assert_allclose(got[b], position.apply_rope(x[b:b + 1], seq[b])[0], rtol=1e-6)
  cells = jnp.array([[[0, 0], [0, 1], [1, 9]], [[1, 2], [0, 7], [1, 3]]])
  got = position.apply_rope(x, cells)  # [batch, t, 2]: a grid by its rank.
  for b in range(2):
    np.testing.assert_allclose(got[b], position.apply_rope(x[b:b + 1], cells[b])[0], rtol=1e-6)
  # [t, 2] stays a grid, as before per-example positions existed.
  assert not np.allclose(position.apply_rope(x[:, :2], seq[:, :2].T),
                         position.apply_rope(x[:, :2], seq[:, :2], grid=False))


@pytest.mark.parametrize("kind,grid", [("learned", None), ("sinusoidal", None),
                                       ("learned", (2, 64)), ("learned_2d", (2, 64)),
                                       ("sinusoidal", (2, 64)), ("sinusoidal_2d", (2, 64)),
                                       ("rope", None), ("rope", (2, 64))])
def test_encodings_up_to_the_last_position_are_finite_and_distinct(kind, grid):
  """Every position a model has, far past those training lines use (decoder: 40 positions;
  encoder: a 2 x 64 grid, a 512-pixel bucket of 8-pixel patches), has its own finite code."""
  width, length = 32, 40 if grid is None else grid[0] * grid[1]
  if kind == "rope":
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 1, 1, width)),
                         (1, length, 1, width))
    cells = jnp.arange(length) if grid is None else jnp.asarray(position.grid_positions(*grid))
    codes = np.asarray(position.apply_rope(x, cells))[0, :, 0]
  else:
    layer = position.AddPositionEncoding(kind, length, grid)
    zeros = jnp.zeros((1, length, width))
    codes = np.asarray(layer.apply(layer.init(jax.random.key(0), zeros), zeros))[0]
  chex.assert_shape(codes, (length, width))
  assert np.isfinite(codes).all()
  distance = np.linalg.norm(codes[:, None] - codes[None, :], axis=-1)
  assert distance[~np.eye(length, dtype=bool)].min() > 1e-3
