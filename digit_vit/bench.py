"""Benchmark: how fast the model trains, evaluates and reads on this machine, and how close that
is to the machine's float32 matmul peak.

  python -m digit_vit.bench --config=configs/bench.py
  python -m digit_vit.bench --config=configs/default.py --only=pipeline   # vs. the train step
  python -m digit_vit.bench --config=configs/bench.py --json=bench.json
  python -m digit_vit.bench --only=serve --workdir=runs/long [--model=EXPORTED_DIR]

`--only=serve` measures an exported reader (`digit_vit.export` of the run, or --model) against
the in-process `predict.Reader` of the same run (`serve_figures`): the cold start (process start
to the first reading, in a fresh process; the exported reader with an empty and with a warm
persistent compilation cache), the latency of reading one image (p50, p99) and the throughput
of reading batches of 64 lines. Targets on the 2-core development CPU, greedy: cold start <= 3 s,
p50 <= 15 ms, throughput within 10% of the in-process Reader (`SERVE_TARGETS`).

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
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from digit_vit import cli, environment, profiling, tasks, xla_options
from digit_vit.data import compose
from digit_vit.models import tokens

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global.
  argv: the command line whose `--config.x=...` overrides the config flag takes (default
  sys.argv)."""
  config_flags.DEFINE_config_file("config", "configs/bench.py", "Config file.",
                                  flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_list(
      "only", [], "Measure only these: peak, train, eval, decode, pipeline, serve (default: "
      "all but serve).", flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "serve: the reading run whose exported reader is measured "
                      "against its in-process predict.Reader.", flag_values=flag_values)
  flags.DEFINE_string("model", None, "serve: the run's exported reader (default: export "
                      "--workdir into a temporary directory).", flag_values=flag_values)
  flags.DEFINE_string("json", None, "Also write the figures to this JSON file.",
                      flag_values=flag_values)
  flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.", flag_values=flag_values)
  flags.DEFINE_string(
      "profile", None, "Trace the timed calls with jax.profiler into this directory (open it in "
      "Perfetto or TensorBoard) and print the XLA operations that took the most time.",
      flag_values=flag_values)
  flags.DEFINE_integer("profile_top", 25, "Operations listed per profiled part.",
                       flag_values=flag_values)


PARTS = ("peak", "train", "eval", "decode", "pipeline", "serve")
# Measured by default (serve needs a trained run, --workdir).
DEFAULT_PARTS = ("peak", "train", "eval", "decode", "pipeline")


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
  if len(widths) == 1 or not tasks.get(config).reads_lines:
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
    return _flops(xla_options.jit(fn, matmul_dtype=model_config.matmul_dtype).lower(*args)
                  .compile())

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
    compiled = recorder.compile(
        name, xla_options.jit(fn, matmul_dtype=model_config.matmul_dtype), (params, images))
    outputs, _ = compiled(params, images)
    if bool(jnp.any(outputs == tokens.EOS)):
      raise AssertionError(f"{name}: a row stopped early despite the <eos> bias")
    recorder.time(name, lambda c=compiled: c(params, images), work, batch,
                  repeats=max(recorder.repeats // 2, 2), hlo_text=compiled.as_text())


def run(config, parts=DEFAULT_PARTS, repeats: int = 10, profile_dir: str | None = None,
        profile_top: int = 25, workdir: str | None = None,
        model: str | None = None) -> dict[str, float]:
  """Measures the requested parts for `config`; returns the figures by name. With
  `profile_dir`, each part's timed calls are also traced there and summarised per operation.
  'serve' measures the run in `workdir` (and its export `model`), see `serve_figures`."""
  from digit_vit import state as state_lib, steps
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
    mesh = state_lib.create_mesh()
    learning_rate_fn = state_lib.create_learning_rate_fn(config)
    tx = state_lib.create_optimizer(config, learning_rate_fn)
    state = state_lib.create_train_state(config, model, tx, mesh)
    results["parameters"] = sum(x.size for x in jax.tree.leaves(state.params))
    batch = _fake_batch(config, batch_size)
    stepper = steps.Stepper(config, model, learning_rate_fn, mesh)
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
  reads_lines = tasks.get(config).reads_lines  # Eval and decode time the reader's passes.
  if "eval" in parts and reads_lines:
    forward = xla_options.jit(lambda p, b: model.apply(
        {"params": p}, b["image"], b["tokens"][:, :-1]),
        matmul_dtype=xla_options.matmul_dtype_of(config))
    recorder.throughput("eval", forward, (state.params, global_batch), batch_size)
  if "decode" in parts and reads_lines:
    _decode_throughputs(recorder, config, state.params, global_batch["image"])
  if "pipeline" in parts:
    from digit_vit.data import benchmark
    results["pipeline_images_per_s"] = benchmark.pipeline_images_per_second(config)
    results["pipeline_over_train"] = (results["pipeline_images_per_s"]
                                      / results["train_images_per_s"])
  if "serve" in parts:
    if workdir is None:
      raise ValueError("--only=serve needs --workdir: a trained reading run")
    results.update(serve_figures(workdir, model, repeats=repeats))
  results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return results


# ----------------------------------------------------------------------------------------------
# Serving: an exported reader against the in-process predict.Reader

# (figure, bound, 'max' or 'min'): what issue 44 asks of an exported reader on this CPU, greedy.
SERVE_TARGETS = (("serve_exported_cold_start_cached_s", 3.0, "max"),
                 ("serve_exported_latency_p50_ms", 15.0, "max"),
                 ("serve_throughput_ratio", 0.9, "min"))
SERVE_BATCH = 64

# Run in a fresh interpreter: from its start (argv[1], the parent's time.time() just before it
# started) to its first reading of the image argv[4], by the exported reader (argv[2]
# 'exported', argv[3] its directory) or the in-process Reader ('reader', a run's directory).
_COLD_START = """
import json, sys, time
start, kind, source, image = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
if kind == "exported":
  from digit_vit import preprocess, serving
  serving.enable_compilation_cache()
  reader = serving.load(source, batch_size=1)
else:
  from digit_vit import predict as preprocess
  reader = preprocess.Reader(source, batch_size=1)
reading = reader.read([preprocess.load_image(image)])[0]
seconds = time.time() - start
heavy = sorted(m for m in ("flax", "optax", "orbax", "tensorflow", "ml_collections")
               if m in sys.modules)
print(json.dumps({"seconds": seconds, "digits": reading.digits, "heavy": heavy}))
"""


def cold_start_seconds(kind: str, source: str, image: str, *,
                       cache_dir: str | None = None) -> dict:
  """Process start to the first reading of `image`, in a fresh Python process.

  Args:
    kind: 'exported' (`serving.load(source)`) or 'reader' (`predict.Reader(source)`).
    cache_dir: jax's persistent compilation cache for the process (every program kept); None
      turns it off.

  Returns:
    {'seconds', 'digits' (what it read), 'heavy' (heavy modules it imported)}.
  """
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")
         and k != "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"}
  if cache_dir is None:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  else:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  start = time.time()
  result = subprocess.run([sys.executable, "-c", _COLD_START, repr(start), kind, source, image],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
  lines = result.stdout.strip().splitlines()
  if result.returncode != 0 or not lines:
    raise RuntimeError(f"the cold-start process ({kind}) failed: {result.stderr[-2000:]}")
  return json.loads(lines[-1])


def _serve_images(workdir: str, n: int) -> list[np.ndarray]:
  """n lines of the wild split's composer (1-8 test-split digits each), uint8 [H, W]."""
  from digit_vit.data import sources, wild  # pylint: disable=import-outside-toplevel
  del workdir  # The lines do not depend on the run: every run reads the same images.
  digits = sources.load_digits("embedded", "test", validation_per_class=40)
  return [image for image, _, _ in wild.generate("wild", digits, n, seed=0)]


def _latencies_ms(read: Callable[[np.ndarray], object], images, repeats: int) -> list[float]:
  for image in images:  # Warm-up: compiles every bucket the images fall in.
    read(image)
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    read(images[i % len(images)])
    times.append(1000 * (time.perf_counter() - start))
  return times


def _rates(read: Callable[[], object], batch: int, repeats: int) -> list[float]:
  read()  # Warm-up (compilation).
  return sorted(batch / t for t in _call_seconds(read, repeats))


def serve_figures(workdir: str, model: str | None = None, *, repeats: int = 10) -> dict:
  """The exported reader (`model`, else `workdir` exported into a temporary directory)
  against the in-process `predict.Reader` of `workdir`, decoding as the export does.

  Figures (`serve_exported_*` and `serve_reader_*`):
    cold_start_s: process start to the first reading of one image, in a fresh process (the
      exported reader: `cold_start_cached_s` again with the compilation cache the first run
      filled, as `predict --model` and the demo keep it);
    latency_p50_ms, latency_p99_ms: one image read (`read([image])`, preprocessing included),
      over 10 x `repeats` calls cycling through 64 wild lines, after a warm-up on each;
    images_per_s (median, _min, _max): `read_prepared` of the same 64 prepared lines, the
      Reader with batch_size 64 (the exported reader reads up to 64 a call). The lines fall
      in several width buckets and each reader batches them its own way: the Reader pads
      every bucket's call to its 64 rows, the exported reader to the next power of two, so
      the ratio measures that difference as well as the compiled code's;
  and serve_throughput_ratio (exported over in-process) and serve_targets_met.
  """
  import tempfile  # pylint: disable=import-outside-toplevel
  from digit_vit import export, predict, serving  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  results: dict[str, Any] = {}
  with tempfile.TemporaryDirectory(prefix="bench_serve_") as scratch:
    if model is None:
      model = os.path.join(scratch, "exported")
      export.export_reader(workdir, model)
    exported = serving.load(model, batch_size=SERVE_BATCH)
    decoding = dict(beam_size=exported.beam_size, alpha=exported.alpha, views=exported.views)
    results.update({f"serve_{k}": v for k, v in decoding.items()})
    images = _serve_images(workdir, SERVE_BATCH)
    image_path = os.path.join(scratch, "line.png")
    Image.fromarray(images[0]).save(image_path)
    cache = os.path.join(scratch, "jax_cache")
    for name, kind, source, cache_dir in (
        ("exported_cold_start_s", "exported", model, cache),
        ("exported_cold_start_cached_s", "exported", model, cache),
        ("reader_cold_start_s", "reader", workdir, None)):
      measured = cold_start_seconds(kind, source, image_path, cache_dir=cache_dir)
      results[f"serve_{name}"] = measured["seconds"]
      if kind == "exported" and measured["heavy"]:
        raise AssertionError(f"the exported reader imported {measured['heavy']}")
    single = predict.Reader(workdir, batch_size=1, **decoding)
    batched = predict.Reader(workdir, batch_size=SERVE_BATCH, **decoding)
    for name, reader, latency_reader in (("exported", exported, exported),
                                         ("reader", batched, single)):
      times = _latencies_ms(lambda image, r=latency_reader: r.read([image]), images,
                            10 * repeats)
      results[f"serve_{name}_latency_p50_ms"] = float(np.percentile(times, 50))
      results[f"serve_{name}_latency_p99_ms"] = float(np.percentile(times, 99))
      canvases = reader.prepare(images)
      rates = _rates(lambda r=reader: r.read_prepared(canvases), SERVE_BATCH, repeats)
      results[f"serve_{name}_images_per_s"] = float(np.median(rates))
      results[f"serve_{name}_images_per_s_min"] = rates[0]
      results[f"serve_{name}_images_per_s_max"] = rates[-1]
    mismatched = sum(a.tokens != b.tokens for a, b in zip(exported.read(images),
                                                          batched.read(images)))
    if mismatched:
      raise AssertionError(f"the exported reader read {mismatched} of {len(images)} lines "
                           "differently from the in-process Reader")
  results["serve_throughput_ratio"] = (results["serve_exported_images_per_s"]
                                       / results["serve_reader_images_per_s"])
  results["serve_targets_met"] = all(
      results[key] <= bound if kind == "max" else results[key] >= bound
      for key, bound, kind in SERVE_TARGETS)
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
  parts = tuple(FLAGS.only) or DEFAULT_PARTS
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    return cli.error(f"--only got {unknown}; choose from {PARTS}", cli.USAGE)
  if "serve" in parts and not FLAGS.workdir:
    return cli.error("--only=serve needs --workdir: a trained reading run (and optionally "
                     "--model, its exported reader)", cli.USAGE)
  if "serve" in parts:
    from digit_vit import logs  # pylint: disable=import-outside-toplevel
    logs.quiet_libraries()  # orbax's restore chatter around the figures.
  config = FLAGS.config
  print(f"devices: {jax.devices()}  batch: {config.batch_size}  "
        f"attention: {config.model.attention_impl}  "
        f"compiler options: "
        f"{xla_options.compiler_options(xla_options.matmul_dtype_of(config)) or 'XLA defaults'}")
  ran_on = environment.describe()
  print(f"cpu: {ran_on['cpu']} ({ran_on['cpu_count']} cores, "
        f"{ran_on['cpu_vector_extensions'] or 'no x86 vector extension'})  "
        f"jax {ran_on['packages']['jax']}")
  results = run(config, parts, FLAGS.repeats, FLAGS.profile, FLAGS.profile_top,
                workdir=FLAGS.workdir, model=FLAGS.model)
  print(format_results(results))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({**results, "environment": ran_on}, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
