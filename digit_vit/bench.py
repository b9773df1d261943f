"""Benchmark: how fast the model trains, evaluates and reads on this machine, and how close that
is to the machine's float32 matmul peak.

  python -m digit_vit.bench --config=configs/bench.py
  python -m digit_vit.bench --config=configs/default.py --only=pipeline   # vs. the train step
  python -m digit_vit.bench --config=configs/bench.py --json=bench.json

Images are one width bucket wide (`bench_width`: the bucket of the config's longest training
lines; configs/bench.py has the one, 192). Throughputs are images per second over repeated
calls after a warm-up (min / median / max
are printed); FLOPs per image come from XLA's cost analysis of the compiled functions, so
"fraction of peak" compares like with like: model FLOPs actually executed per second over the
FLOP/s of a 2048^3 float32 matmul measured in the same run: numpy's (the issue's yardstick),
XLA's, and, where the environment pins OpenBLAS to an older kernel (OPENBLAS_CORETYPE), numpy's
without the pin, measured in a child process.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from digit_vit import environment, profiling, xla_options
from digit_vit.data import compose
from digit_vit.models import tokens

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command's flags when it runs, not on import: absl flags are global and
  `main` defines --config too."""
  config_flags.DEFINE_config_file("config", "configs/bench.py", "Config file.")
  flags.DEFINE_list(
      "only", [], "Measure only these: peak, train, eval, decode, pipeline (default: all).")
  flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
  flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.")
  flags.DEFINE_string(
      "profile", None, "Trace the timed calls with jax.profiler into this directory (open it in "
      "Perfetto or TensorBoard) and print the XLA operations that took the most time.")
  flags.DEFINE_integer("profile_top", 25, "Operations listed per profiled part.")


PARTS = ("peak", "train", "eval", "decode", "pipeline")


def _call_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


# Environment variables that pin OpenBLAS to an older kernel than the CPU could run (some
# machines set them to work around old OpenBLAS bugs); they lower numpy's matmul peak.
OPENBLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _square_operands(n: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  return rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)


def _matmul_gflops(matmul: Callable[[], object], n: int, repeats: int) -> float:
  """GFLOP/s of the n^3 `matmul` (already warmed up), median of `repeats` calls."""
  return 2.0 * n ** 3 / np.median(_call_seconds(matmul, repeats)) / 1e9


def numpy_matmul_gflops(repeats: int = 5, n: int = 2048) -> float:
  """Float32 n^3 matmul GFLOP/s with numpy (its BLAS), median of `repeats`."""
  a, b = _square_operands(n)
  np.dot(a, b)
  return _matmul_gflops(lambda: np.dot(a, b), n, repeats)


def unpinned_numpy_matmul_gflops(repeats: int = 5, n: int = 2048) -> float | None:
  """numpy's matmul GFLOP/s in a child process without `OPENBLAS_PINS` (OpenBLAS picks its
  kernel when it loads, so this process cannot measure it); None where nothing is pinned."""
  if not any(name in os.environ for name in OPENBLAS_PINS):
    return None
  env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_PINS}
  code = (f"from digit_vit import bench; print(bench.numpy_matmul_gflops({repeats}, {n}))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True)
  return float(out.stdout.split()[-1])


def matmul_peak_gflops(repeats: int = 5, n: int = 2048) -> dict[str, float]:
  """Float32 n^3 matmul GFLOP/s with numpy (BLAS) and with XLA, median of `repeats`; also
  numpy's without the OpenBLAS pins, where the environment sets them."""
  xa, xb = map(jnp.asarray, _square_operands(n))
  dot = jax.jit(jnp.dot)
  dot(xa, xb).block_until_ready()
  peaks = {"numpy_peak_gflops": numpy_matmul_gflops(repeats, n),
           "xla_peak_gflops": _matmul_gflops(lambda: dot(xa, xb), n, repeats)}
  unpinned = unpinned_numpy_matmul_gflops(repeats, n)
  if unpinned is not None:
    peaks["numpy_unpinned_peak_gflops"] = unpinned
  return peaks


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


class _Recorder:
  """Compiles and times the measured functions, collecting their figures in `results`.

  Attributes:
    results: figure name -> value, filled in as parts are measured; the matmul peaks in it
      (`<peak>_peak_gflops`) give each throughput its fractions of peak.
    repeats: timed calls per measurement.
    profile_dir: if set, the timed calls of each part are traced into `profile_dir/<part>`
      and the operations that took the most time are printed (`profile_top` of them).
  """

  def __init__(self, repeats: int, profile_dir: str | None = None, profile_top: int = 25):
    self.results: dict[str, float] = {}
    self.repeats = repeats
    self.profile_dir = profile_dir
    self.profile_top = profile_top

  def compile(self, name, fn, args):
    """Compiles the jitted `fn` for `args`, recording `{name}_compile_s`."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    self.results[f"{name}_compile_s"] = time.perf_counter() - start
    return compiled

  def time(self, name, call, flops, batch, *, repeats=None, hlo_text=None):
    """Times `call` (one batch of `batch` images) after a warm-up call; records images/s
    (median, min, max) and, from XLA's `flops` per call, FLOP figures under `name`."""
    repeats = repeats or self.repeats
    jax.block_until_ready(call())
    if self.profile_dir:
      with profiling.trace(os.path.join(self.profile_dir, name)) as trace:
        times = _call_seconds(call, repeats)
      print(f"--- {name}: time per call by XLA operation (trace in {trace.path})")
      print(profiling.format_table(trace.op_times(), calls=repeats, top=self.profile_top,
                                   hlo_text=hlo_text))
    else:
      times = _call_seconds(call, repeats)
    rates = sorted(batch / t for t in times)
    results = self.results
    results[f"{name}_images_per_s"] = float(np.median(rates))
    results[f"{name}_images_per_s_min"] = rates[0]
    results[f"{name}_images_per_s_max"] = rates[-1]
    if flops:
      results[f"{name}_flops_per_image"] = flops / batch
      results[f"{name}_gflops"] = flops / batch * results[f"{name}_images_per_s"] / 1e9
      for peak in ("numpy", "xla", "numpy_unpinned"):
        if f"{peak}_peak_gflops" in results:
          results[f"{name}_fraction_of_{peak}_peak"] = (
              results[f"{name}_gflops"] / results[f"{peak}_peak_gflops"])

  def throughput(self, name, fn, args, batch):
    """Compiles the jitted `fn` and times it on the same `args` every call."""
    compiled = self.compile(name, fn, args)
    self.time(name, lambda: compiled(*args), _flops(compiled), batch,
              hlo_text=compiled.as_text())


def bench_width(config) -> int:
  """The width the benchmark's images have: the narrowest width bucket that holds a line of
  `max_digits` digits of the mean training size (a config with one bucket: that width), the
  bucket the longest training lines mostly train in."""
  from digit_vit.data import buckets, input_pipeline  # pylint: disable=import-outside-toplevel
  widths = buckets.width_buckets(config)
  if len(widths) == 1 or config.task != "read":
    return widths[-1]
  comp = input_pipeline.builder_config_from(config).composition()
  longest = compose.expected_width(int(config.max_digits), comp)
  return next((w for w in widths if w >= longest), widths[-1])


def _fake_batch(config, batch_size):
  """Random images and token rows of random lengths: speed does not depend on content."""
  rng = np.random.default_rng(0)
  m = config.model
  lengths = rng.integers(1, config.max_digits + 1, batch_size)
  digits = ["".join(map(str, rng.integers(0, 10, n))) for n in lengths]
  return {
      "image": rng.random((batch_size, m.image_height, bench_width(config), m.image_channels),
                          np.float32),
      "tokens": tokens.encode_batch(digits, config.max_digits),
      "mask": np.ones((batch_size,), bool),
  }


def full_length_params(params):
  """`params` with the `<eos>` logit pushed to -1e4: the decoder then never stops early, so a
  benchmarked decode always runs all max_length steps and its work is the same in every run,
  trained weights or random ones."""
  decoder = dict(params["decoder"])
  logits = dict(decoder["logits"])
  logits["bias"] = logits["bias"].at[tokens.EOS].set(-1e4)
  decoder["logits"] = logits
  return {**params, "decoder": decoder}


def _decode_throughputs(recorder, config, params, images):
  """Cached greedy, uncached greedy and beam-4 decoding at full length.

  XLA's cost analysis counts a while loop's body once, so the FLOPs of a decode are assembled
  from its parts: the encoder and cache set-up once, plus max_length decoder steps (one token
  with the cache; the whole max_length prefix without it; batch x 4 rows for beam 4).
  """
  from digit_vit import decode  # pylint: disable=import-outside-toplevel
  from digit_vit.models import ModelConfig, DigitReader  # pylint: disable=import-outside-toplevel
  model_config = ModelConfig.from_config(config.model)
  params = full_length_params(params)
  batch, length = images.shape[0], model_config.max_length
  model = DigitReader(model_config)
  memory, cache = jax.jit(functools.partial(decode.encode_and_init_cache, model_config))(
      params, images)

  def flops(fn, *args):
    return _flops(xla_options.jit(fn).lower(*args).compile())

  setup = flops(functools.partial(decode.encode_and_init_cache, model_config), params, images)
  token = jnp.full((batch,), tokens.SOS, jnp.int32)
  step = flops(functools.partial(decode.decode_step, model_config), params, cache, token, memory)
  prefix = jnp.full((batch, length), tokens.SOS, jnp.int32)
  full_decoder = flops(lambda p, t, m: model.apply({"params": p}, t, m,
                                                    method=DigitReader.decode_tokens),
                       params, prefix, memory)
  # Beam 4 steps on 4x the rows; its encoder runs once per image.
  beam_step = 4 * step
  for name, fn, work in (
      ("decode", functools.partial(decode.greedy_decode, model_config), setup + length * step),
      ("decode_uncached", functools.partial(decode.greedy_decode_uncached, model_config),
       setup + length * full_decoder),
      ("decode_beam4", functools.partial(decode.beam_search, model_config, beam_size=4),
       setup + length * beam_step)):
    compiled = recorder.compile(name, xla_options.jit(fn), (params, images))
    outputs, _ = compiled(params, images)
    if bool(jnp.any(outputs == tokens.EOS)):
      raise AssertionError(f"{name}: a row stopped early despite the <eos> bias")
    recorder.time(name, lambda c=compiled: c(params, images), work, batch,
                  repeats=max(recorder.repeats // 2, 2), hlo_text=compiled.as_text())


def run(config, parts=PARTS, repeats: int = 10, profile_dir: str | None = None,
        profile_top: int = 25) -> dict[str, float]:
  """Measures the requested parts for `config`; returns the figures by name. With
  `profile_dir`, each part's timed calls are also traced there and summarised per operation."""
  from digit_vit import train
  from digit_vit.models import build_model

  recorder = _Recorder(repeats, profile_dir, profile_top)
  results = recorder.results
  if "pipeline" in parts and "train" not in parts:
    # The pipeline's rate means something only beside what the train step consumes.
    parts = tuple(parts) + ("train",)
  if "peak" in parts:
    results.update(matmul_peak_gflops())
  batch_size = config.batch_size
  if any(p in parts for p in ("train", "eval", "decode")):
    model = build_model(config)
    mesh = train.create_mesh()
    learning_rate_fn = train.create_learning_rate_fn(config)
    tx = train.create_optimizer(config, learning_rate_fn)
    state = train.create_train_state(config, model, tx, mesh)
    results["parameters"] = sum(x.size for x in jax.tree.leaves(state.params))
    batch = _fake_batch(config, batch_size)
    stepper = train.Stepper(config, model, learning_rate_fn, mesh)
    global_batch = stepper.global_batch({k: v for k, v in batch.items() if k != "mask"})
  if "train" in parts:
    # The step training runs (shardings, donated state); each timed call continues from the
    # previous call's state, as training does.
    compiled = recorder.compile("train", stepper.jit_step, (state, global_batch))
    holder = [state]

    def one_step():
      holder[0], step_metrics = compiled(holder[0], global_batch)
      return step_metrics
    recorder.time("train", one_step, _flops(compiled), batch_size,
                  hlo_text=compiled.as_text())
    state = holder[0]
  if "eval" in parts and config.task == "read":
    forward = xla_options.jit(lambda p, b: model.apply(
        {"params": p}, b["image"], b["tokens"][:, :-1]))
    recorder.throughput("eval", forward, (state.params, global_batch), batch_size)
  if "decode" in parts and config.task == "read":
    _decode_throughputs(recorder, config, state.params, global_batch["image"])
  if "pipeline" in parts:
    from digit_vit.data import benchmark
    results["pipeline_images_per_s"] = benchmark.pipeline_images_per_second(config)
    results["pipeline_over_train"] = (results["pipeline_images_per_s"]
                                      / results["train_images_per_s"])
  results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return results


def format_results(results: dict[str, float]) -> str:
  lines = []
  for key, value in results.items():
    if isinstance(value, float):
      value = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    lines.append(f"{key:40s} {value}")
  return "\n".join(lines)


def main(argv):
  del argv
  parts = tuple(FLAGS.only) or PARTS
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise app.UsageError(f"--only got {unknown}; choose from {PARTS}")
  config = FLAGS.config
  print(f"devices: {jax.devices()}  batch: {config.batch_size}  "
        f"attention: {config.model.attention_impl}  "
        f"compiler options: {xla_options.compiler_options() or 'XLA defaults'}")
  ran_on = environment.describe()
  print(f"cpu: {ran_on['cpu']} ({ran_on['cpu_count']} cores, "
        f"{ran_on['cpu_vector_extensions'] or 'no x86 vector extension'})  "
        f"jax {ran_on['packages']['jax']}")
  results = run(config, parts, FLAGS.repeats, FLAGS.profile, FLAGS.profile_top)
  print(format_results(results))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({**results, "environment": ran_on}, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
