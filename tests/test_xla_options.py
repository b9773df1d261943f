"""The compiler options the project's jitted functions get."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit import config_lib, xla_options

NO_YNN = {xla_options.YNN_OPTION: ""}
DOTS_ONLY = {xla_options.YNN_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def test_ynn_fusions_are_off_on_cpu_but_dots_alone_for_bfloat16_products():
  assert xla_options.options_for("cpu", "") == NO_YNN
  assert xla_options.options_for("cpu", "--xla_force_host_platform_device_count=8") == NO_YNN
  assert xla_options.options_for("cpu", "", matmul_dtype="bfloat16") == DOTS_ONLY
  # A user's own choice in XLA_FLAGS is left alone, and other backends get nothing.
  assert xla_options.options_for("cpu", f"--{xla_options.YNN_OPTION}=dot") == {}
  assert xla_options.options_for("cpu", "", xla_defaults=True, matmul_dtype="bfloat16") == {}
  assert xla_options.options_for("gpu", "", matmul_dtype="bfloat16") == {}
  assert xla_options.options_for("tpu", "") == {}
  with pytest.raises(ValueError, match="matmul_dtype='float16'"):
    xla_options.options_for("cpu", "", matmul_dtype="float16")


def test_a_configs_matmul_dtype_chooses_its_options():
  config = config_lib.load("configs/tiny.py")
  assert xla_options.matmul_dtype_of(config) == "float32"
  config.model.matmul_dtype = "bfloat16"
  assert xla_options.matmul_dtype_of(config) == "bfloat16"
  assert xla_options.matmul_dtype_of({"model": {"width": 8}}) == "float32"  # A run from before.
  assert xla_options.matmul_dtype_of({}) == "float32"


@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_jit_compiles_with_the_options_and_computes_the_same(matmul_dtype):
  def mlp(x, w):
    return jax.nn.gelu(x @ w) @ w.T
  x = jax.random.normal(jax.random.key(0), (64, 32))
  w = jax.random.normal(jax.random.key(1), (32, 48))
  compiled = xla_options.jit(mlp, matmul_dtype=matmul_dtype).lower(x, w).compile()
  plain = jax.jit(mlp).lower(x, w).compile()
  np.testing.assert_allclose(compiled(x, w), plain(x, w), rtol=1e-5, atol=1e-5)
  if jax.default_backend() == "cpu" and xla_options.compiler_options(matmul_dtype):
    fusions = [line for line in compiled.as_text().splitlines()
               if '"kind":"__ynn_fusion"' in line]
    if matmul_dtype == "float32":
      assert not fusions
    else:  # Each of the two dots is a YNNPACK fusion of its own; the GELU is in neither.
      assert len(fusions) == 2 and all("dot_general" in line for line in fusions), fusions
  assert xla_options.jit(lambda a: a * 2)(jnp.ones(3)).tolist() == [2.0, 2.0, 2.0]
