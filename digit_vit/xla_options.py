"""XLA compiler options for the project's compiled functions, chosen by measurement.

XLA's CPU backend (jaxlib 0.10) hands dots, and the element-wise work around them, to YNNPACK
fusions. On this model those fusions need every scalar and LayerNorm scale broadcast to a full
activation in memory first; with them off, evaluation ran 20-40% and cached greedy decoding
16-20% faster on the 2-core development machine, and the train step the same
(docs/performance.md has the figures and the commands). So on CPU the train, eval, decode and
predict functions are compiled with `--xla_cpu_experimental_ynn_fusion_type=` (an empty list:
no YNN fusions). `jax.pmap` takes no compiler options, so `parallelism='pmap'` keeps XLA's.

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
_CPU_OPTIONS = {YNN_OPTION: ""}
DEFAULTS_VARIABLE = "DIGIT_VIT_XLA_DEFAULTS"  # Set (not '0') for XLA's own options.


def options_for(backend: str, xla_flags: str, xla_defaults: bool = False) -> dict[str, str]:
  """The options wanted on `backend` given the user's `XLA_FLAGS` and whether XLA's own
  defaults were asked for (before checking that the installed XLA knows them)."""
  if xla_defaults or backend != "cpu" or YNN_OPTION in xla_flags:
    return {}
  return dict(_CPU_OPTIONS)


@functools.cache
def compiler_options() -> dict[str, str]:
  """Options for `jax.jit(..., compiler_options=...)` on the default backend."""
  options = options_for(jax.default_backend(), os.environ.get("XLA_FLAGS", ""),
                        os.environ.get(DEFAULTS_VARIABLE, "") not in ("", "0"))
  if not options:
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
  except Exception:  # noqa: BLE001 - an XLA without the option keeps its own defaults
    return {}
  return options


def jit(fn, **kwargs):
  """`jax.jit(fn, **kwargs)` with this backend's `compiler_options()`."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)
