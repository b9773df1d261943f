"""The per-operation profile: trace events are read back and named after the JAX operations
that produced them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_vit import bench, config_lib, profiling


def _matmul_then_gelu(a, b):
  return jax.nn.gelu(a @ b, approximate=False)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
  fn = jax.jit(_matmul_then_gelu)
  a = jnp.ones((128, 256), jnp.float32)
  b = jnp.ones((256, 64), jnp.float32)
  compiled = fn.lower(a, b).compile()
  compiled(a, b).block_until_ready()
  with profiling.trace(str(tmp_path_factory.mktemp("trace"))) as trace:
    for _ in range(3):
      compiled(a, b).block_until_ready()
  return trace, compiled.as_text()


def test_every_executed_operation_is_an_instruction_of_the_module(traced):
  trace, hlo_text = traced
  times = trace.op_times()
  assert times and all(t >= 0 for t in times.values())
  described = profiling.describe_ops(hlo_text)
  assert set(times) <= set(described), set(times) - set(described)


def test_the_dot_is_traced_and_named_after_its_jax_operation(traced):
  trace, hlo_text = traced
  described = profiling.describe_ops(hlo_text)
  dots = [name for name in trace.op_times() if "dot_general" in described[name]]
  assert dots, described
  # Three calls, one event per call for each operation.
  events = [e for e in trace.events() if e["args"]["hlo_op"] == dots[0]]
  assert len(events) == 3


def test_table_lists_operations_by_time_per_call(traced):
  trace, hlo_text = traced
  times = trace.op_times()
  table = profiling.format_table(times, calls=3, top=2, hlo_text=hlo_text).splitlines()
  assert len(table) == 2 + min(2, len(times))
  total_ms = float(table[1].split()[0])
  assert total_ms == pytest.approx(sum(times.values()) / 1e3 / 3, abs=0.01)
  shown = [float(line.split()[0]) for line in table[2:]]
  assert shown == sorted(shown, reverse=True)


def test_describe_ops_reads_opcode_kind_op_name_and_fused_operations():
  text = """
%fused_erf (param_0: f32[8,4]) -> f32[8,4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %erf.1 = f32[8,4]{1,0} exponential(f32[8,4]{1,0} %param_0), metadata={op_name="erf"}
  ROOT %mul.2 = f32[8,4]{1,0} multiply(%erf.1, %param_0), metadata={op_name="mul"}
}

ENTRY %main.2 (a.1: f32[8,4], b.1: f32[4,8]) -> (f32[8,8], f32[8,4]) {
  %p = f32[8,4]{1,0} parameter(0)
  %fusion.3 = f32[8,4]{1,0} fusion(f32[8,4]{1,0} %p), kind=kLoop, calls=%fused_erf, metadata={op_name="jit(step)/jit(main)/encoder/mlp/mul" source_file="x.py"}
  %dot.1 = f32[8,8]{1,0} dot(f32[8,4]{1,0} %a, f32[4,8]{1,0} %b), metadata={op_name="jit(step)/decoder/logits/dot_general"}
  ROOT %tuple.1 = (f32[8,8]{1,0}, f32[8,4]{1,0}) tuple(%dot.1, %fusion.3)
}
"""
  described = profiling.describe_ops(text)
  assert described["fusion.3"] == "fusion/kLoop  encoder/mlp/mul  {exponential, multiply}"
  assert described["dot.1"] == "dot  decoder/logits/dot_general"
  assert described["tuple.1"] == "tuple"


def test_missing_trace_says_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match="trace.json.gz"):
    profiling.Trace(str(tmp_path)).events()


def test_bench_profiles_each_part(tmp_path, capsys):
  config = config_lib.load("tiny")
  config.data.data_dir = str(tmp_path / "tfds")
  figures = bench.run(config, parts=("train", "eval"), repeats=2,
                      profile_dir=str(tmp_path / "profile"), profile_top=3)
  printed = capsys.readouterr().out
  for part in ("train", "eval"):
    assert f"--- {part}: time per call by XLA operation" in printed
    assert profiling.Trace(str(tmp_path / "profile" / part)).op_times()
    assert figures[f"{part}_images_per_s"] > 0
  assert np.isfinite(figures["train_flops_per_image"])
