"""Where a compiled function spends its time: a jax.profiler trace summarised per XLA operation.

  with profiling.trace("runs/profile/train") as t:
    for _ in range(5):
      jax.block_until_ready(step(state, batch))
  print(profiling.format_table(t.op_times(), calls=5, hlo_text=compiled.as_text()))

The trace directory also opens in Perfetto (`*.trace.json.gz`) or TensorBoard. XLA's CPU
runtime records one event per executed operation (a fusion, a dot, a copy...) with its HLO
name; the compiled module's text maps that name to the JAX operation it came from
(`metadata={op_name=...}`), which is what the table shows beside it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import re

import jax


@dataclasses.dataclass
class Trace:
  """A finished trace directory."""
  path: str

  def events(self) -> list[dict]:
    """The trace's complete ('X') events that are XLA operations."""
    files = sorted(glob.glob(os.path.join(self.path, "**", "*.trace.json.gz"), recursive=True))
    if not files:
      raise FileNotFoundError(f"no *.trace.json.gz under {self.path}; was it traced with "
                              "create_perfetto_trace=True?")
    with gzip.open(files[-1], "rt") as f:
      data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events
            if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]

  def op_times(self) -> dict[str, float]:
    """Total microseconds per HLO operation name, summed over all calls and threads."""
    totals: dict[str, float] = collections.Counter()
    for event in self.events():
      totals[event["args"]["hlo_op"]] += float(event.get("dur", 0.0))
    return dict(totals)


@contextlib.contextmanager
def trace(path: str):
  """Records a jax.profiler trace of the enclosed block into `path`; yields a `Trace`."""
  os.makedirs(path, exist_ok=True)
  result = Trace(path)
  with jax.profiler.trace(path, create_perfetto_trace=True):
    yield result


_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s(\w[\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KIND = re.compile(r"kind=(k\w+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]*)"')
_UNINTERESTING = {"parameter", "constant", "broadcast", "tuple", "get-tuple-element", "bitcast"}


def describe_ops(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> what it is, from a compiled module's text.

  The description is the opcode (with a fusion's kind or a custom call's target), the JAX
  operation it came from, and for a fusion the operations fused into it, e.g.
  'fusion/kLoop  encoder/mlp/mul  {erfc, exponential, multiply, select}'.
  """
  instructions = {}   # name -> (opcode detail, op_name, called computation)
  contents = collections.defaultdict(set)   # computation -> opcodes inside it
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("(")[0]:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode = match.groups()
    if computation and opcode not in _UNINTERESTING:
      contents[computation].add(opcode)
    detail = opcode
    for pattern in (_KIND, _CUSTOM_CALL):
      extra = pattern.search(line)
      if extra:
        detail += "/" + extra.group(1)
    op_name = _OP_NAME.search(line)
    calls = _CALLS.search(line) if opcode == "fusion" else None
    instructions[name] = (detail, _short_op_name(op_name.group(1)) if op_name else "",
                          calls.group(1) if calls else None)
  described = {}
  for name, (detail, op_name, called) in instructions.items():
    text = detail + (f"  {op_name}" if op_name else "")
    if called and contents.get(called):
      text += "  {" + ", ".join(sorted(contents[called])) + "}"
    described[name] = text
  return described


def _short_op_name(op_name: str) -> str:
  """Drops the 'jit(f)/' prefixes and transform wrappers that every name shares."""
  parts = [p for p in op_name.split("/") if not p.startswith("jit(")]
  return "/".join(parts)


def format_table(op_times: dict[str, float], *, calls: int, top: int = 25,
                 hlo_text: str | None = None) -> str:
  """The `top` operations by time, in ms per call and as a share of all operations' time."""
  total = sum(op_times.values())
  described = describe_ops(hlo_text) if hlo_text else {}
  lines = [f"{'ms/call':>8} {'share':>6}  operation",
           f"{total / 1e3 / calls:8.2f} {100.0:5.1f}%  (all operations)"]
  for name, micros in sorted(op_times.items(), key=lambda kv: -kv[1])[:top]:
    desc = described.get(name, "")
    lines.append(f"{micros / 1e3 / calls:8.2f} {100 * micros / total:5.1f}%  {name}"
                 + (f"  [{desc}]" if desc else ""))
  return "\n".join(lines)
