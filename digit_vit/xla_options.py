"""XLA compiler options for the project's compiled functions, chosen by measurement.

XLA's CPU backend (jaxlib 0.10) hands dots, and the element-wise work around them, to YNNPACK
fusions. On this model those fusions need every scalar and LayerNorm scale broadcast to a full
activation in memory first; with them off, evaluation ran 20-40% and cached greedy decoding
16-20% faster on the 2-core development machine, and the train step the same. So float32 runs
compile on CPU with `--xla_cpu_experimental_ynn_fusion_type=` (an empty list: no YNN fusions).

A model with bfloat16 products (`model.matmul_dtype='bfloat16'`) needs YNNPACK for its dots:
that is where a CPU's AMX or AVX-512 BF16 units run them. Its functions compile with
`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`, each dot alone in YNNPACK and nothing fused around it:
1.1x the float32 train step and 1.4x its forward pass on the development machine, where the
same option cost float32 5% and 17% (docs/performance.md has the figures and the commands).
`jax.pmap` takes no compiler options, so `parallelism='pmap'` keeps XLA's.

Set `xla_cpu_experimental_ynn_fusion_type` in `XLA_FLAGS` yourself to choose otherwise; that
setting is then left alone. `DIGIT_VIT_XLA_DEFAULTS=1` passes nothing, for XLA's own defaults
(to measure against them). On other backends, or on an XLA that does not know the option,
nothing is passed either.
"""

from __future__ import annotations

import functools
import os

import jax

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_CPU_OPTIONS = {"float32": {YNN_OPTION: ""},
                "bfloat16": {YNN_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}}
DEFAULTS_VARIABLE = "DIGIT_VIT_XLA_DEFAULTS"  # Set (not '0') for XLA's own options.


def options_for(backend: str, xla_flags: str, xla_defaults: bool = False,
                matmul_dtype: str = "float32") -> dict[str, str]:
  """The options wanted on `backend` for a model whose products take `matmul_dtype` operands,
  given the user's `XLA_FLAGS` and whether XLA's own defaults were asked for (before checking
  that the installed XLA knows them)."""
  if matmul_dtype not in _CPU_OPTIONS:
    raise ValueError(f"matmul_dtype={matmul_dtype!r} is not one of {tuple(_CPU_OPTIONS)}")
  if xla_defaults or backend != "cpu" or YNN_OPTION in xla_flags:
    return {}
  return dict(_CPU_OPTIONS[matmul_dtype])


@functools.cache
def compiler_options(matmul_dtype: str = "float32") -> dict[str, str]:
  """Options for `jax.jit(..., compiler_options=...)` on the default backend."""
  options = options_for(jax.default_backend(), os.environ.get("XLA_FLAGS", ""),
                        os.environ.get(DEFAULTS_VARIABLE, "") not in ("", "0"), matmul_dtype)
  if not options:
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
  except Exception:  # noqa: BLE001 - an XLA without the option keeps its own defaults
    return {}
  return options


def matmul_dtype_of(config) -> str:
  """The `model.matmul_dtype` of a config (ConfigDict or saved dict); 'float32' without one."""
  model = config["model"] if "model" in config else {}
  return str(model.get("matmul_dtype", "float32"))


def jit(fn, *, matmul_dtype: str = "float32", **kwargs):
  """`jax.jit(fn, **kwargs)` with this backend's `compiler_options(matmul_dtype)`."""
  return jax.jit(fn, compiler_options=compiler_options(matmul_dtype), **kwargs)
