"""The compiler options the project's jitted functions get."""

import jax
import jax.numpy as jnp
import numpy as np

from digit_vit import xla_options


def test_ynn_fusions_are_turned_off_on_cpu_unless_the_user_chose():
  assert xla_options.options_for("cpu", "") == {xla_options.YNN_OPTION: ""}
  assert xla_options.options_for("cpu", "--xla_force_host_platform_device_count=8") == {
      xla_options.YNN_OPTION: ""}
  # A user's own choice in XLA_FLAGS is left alone, and other backends get nothing.
  assert xla_options.options_for("cpu", f"--{xla_options.YNN_OPTION}=dot") == {}
  assert xla_options.options_for("cpu", "", xla_defaults=True) == {}
  assert xla_options.options_for("gpu", "") == {}
  assert xla_options.options_for("tpu", "") == {}


def test_jit_compiles_with_the_options_and_computes_the_same():
  def mlp(x, w):
    return jax.nn.gelu(x @ w) @ w.T
  x = jax.random.normal(jax.random.key(0), (64, 32))
  w = jax.random.normal(jax.random.key(1), (32, 48))
  compiled = xla_options.jit(mlp).lower(x, w).compile()
  plain = jax.jit(mlp).lower(x, w).compile()
  np.testing.assert_allclose(compiled(x, w), plain(x, w), rtol=1e-5, atol=1e-5)
  if jax.default_backend() == "cpu" and xla_options.compiler_options():
    assert "__ynn_fusion" not in compiled.as_text()
  assert xla_options.jit(lambda a: a * 2)(jnp.ones(3)).tolist() == [2.0, 2.0, 2.0]
