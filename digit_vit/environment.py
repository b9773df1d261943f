"""What a run ran on: code version, package versions, backend and CPU, for report.json and bench.

A run is a pure function of its config, its code and its packages on a given machine (the same
command gives bit-identical runs there), but XLA compiles for the CPU it finds (vector width,
fused multiply-adds), so two machines need not round alike, and a run's figures can move with
the machine. Recording all of it beside every figure is what lets two figures be told apart.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import pathlib
import platform
import subprocess
from typing import Any

import jax

# The distributions whose versions decide a run's numbers (requirements.lock pins them).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-cpu",
            "tensorflow-datasets")
CPUINFO = "/proc/cpuinfo"


def package_versions() -> dict[str, str]:
  """{distribution: version} of `PACKAGES`, 'absent' for those not installed."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


@functools.cache
def _cpuinfo() -> dict[str, str]:
  """The first processor's fields in /proc/cpuinfo ({} where there is none), read once."""
  fields = {}
  try:
    with open(CPUINFO, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def cpu_model() -> str:
  """The CPU's model name with its family and model numbers (Linux), else what `platform`
  knows. Virtual machines often show only a generic name ('AMD EPYC'); the numbers still tell
  processor generations apart."""
  info = _cpuinfo()
  name = info.get("model name") or platform.processor() or platform.machine() or "unknown"
  if "cpu family" in info and "model" in info:
    name += f" (family {info['cpu family']}, model {info['model']})"
  return name


def cpu_vector_extensions() -> str:
  """The widest x86 vector extension the CPU reports ('avx512f', 'avx2', ...), or ''. XLA
  compiles for the extensions it finds: one reason two machines need not round alike."""
  flags = _cpuinfo().get("flags", "").split()
  return next((ext for ext in ("avx512f", "avx2", "avx", "sse4_2") if ext in flags), "")


def git_commit(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
  """{'commit', 'dirty'} of the git checkout holding `path` (default: this package), or None
  outside a checkout or without git. `dirty`: tracked files differ from the commit."""
  cwd = pathlib.Path(path) if path is not None else pathlib.Path(__file__).resolve().parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                            capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty": bool(status.strip())}


def describe() -> dict[str, Any]:
  """The JSON-ready environment of this process: code, packages, backend, devices and CPU."""
  return {
      "code": git_commit(),
      "python": platform.python_version(),
      "packages": package_versions(),
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "cpu": cpu_model(),
      "cpu_vector_extensions": cpu_vector_extensions(),
      "cpu_count": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
