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
