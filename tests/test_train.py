"""Training: schedules, data-parallel equivalence (jit / pmap / 1 device / 2 processes), the
end-to-end run and its report, resumption after SIGKILL, and the non-finite-loss stop.

The multi-device checks run tests/train_worker.py in subprocesses, because the device count is
fixed when JAX starts; the multi-process check runs `python -m digit_vit.main --jax_distributed`
as two processes.
"""

import functools
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from digit_vit import (checkpointing, config_checks, config_lib, decode, environment, losses,
                       predict, reporting, state as state_lib, steps, train, trained)
from digit_vit.data import input_pipeline
from digit_vit.data.tasks import input_module
from digit_vit.models import build_model, reader as reader_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "train_worker.py"


def _env(devices: int | None = 1) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  if devices and devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def _run_worker(out, *args, devices=1):
  result = subprocess.run([sys.executable, str(WORKER), f"--out={out}", *args], env=_env(devices),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(np.load(out))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  return _run_worker(tmp_path_factory.mktemp("one") / "run.npz")


def _assert_same_run(run, reference, parallelism):
  np.testing.assert_allclose(run[f"loss_{parallelism}"], reference["loss_jit"], rtol=1e-5)
  params = [k for k in reference if k.startswith("jit/")]
  assert len(params) > 20
  for key in params:
    np.testing.assert_allclose(run[key.replace("jit/", f"{parallelism}/")], reference[key],
                               atol=1e-5, err_msg=key)


# ---- Set-up


def test_learning_rate_schedules():
  config = config_lib.load("tiny")
  config.learning_rate, config.warmup_steps, config.num_train_steps = 1.0, 10, 110
  config.end_learning_rate = 0.1
  for schedule, middle in [("cosine", 0.55), ("linear", 0.55), ("constant", 1.0)]:
    config.schedule = schedule
    fn = state_lib.create_learning_rate_fn(config)
    values = [float(fn(s)) for s in (0, 5, 10, 60, 110)]
    end = 1.0 if schedule == "constant" else 0.1
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, middle, end], atol=1e-6, err_msg=schedule)
  config.schedule = "exponential"
  with pytest.raises(ValueError, match="config.schedule"):
    state_lib.create_learning_rate_fn(config)


def test_indivisible_batch_is_a_clear_error(monkeypatch):
  config = config_lib.load("tiny")
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  config.batch_size = 12
  with pytest.raises(ValueError, match=r"config.batch_size=12 .* 8 devices.*multiple of 8"):
    config_checks.check_config(config)
  config.batch_size, config.eval_batch_size = 16, 20
  with pytest.raises(ValueError, match=r"eval_batch_size=20"):
    config_checks.check_config(config)
  config.eval_batch_size, config.parallelism = 16, "vmap"
  with pytest.raises(ValueError, match="parallelism"):
    config_checks.check_config(config)


@pytest.mark.parametrize("name", sorted(
    p.stem for p in config_lib.CONFIG_DIR.glob("*.py") if p.stem != "__init__"))
def test_every_config_file_passes_check_config(name):
  config = config_lib.load(name)
  # Batches split over this process's devices (8 in the second pass of `make test`): a
  # config's batch sizes are for one machine, the rest of it must hold anywhere.
  devices = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    config[field] = devices * -(-config[field] // devices)
  config_checks.check_config(config)


@pytest.mark.parametrize("field, value, expected", [
    ("learning_rate", -1.0, r"config.learning_rate=-1.0 must be a number > 0"),
    ("num_train_steps", 0, r"config.num_train_steps=0 must be an integer >= 1"),
    ("task", "segment", r"config.task='segment' is not one of \('read', 'classify'\)"),
    ("data.name", "bogus", r"config.data.name='bogus'"),
    ("data.source", "nist", r"unknown digit source 'nist'"),
    ("data.min_scale", 0.0, r"config.data.min_scale"),
    ("data.augment.noise_prob", 1.5, r"config.data.augment.noise_prob=1.5 must be in \[0, 1\]"),
    ("batch_size", 0, r"config.batch_size=0 must be an integer >= 1"),
    ("max_digits", 0, r"max_digits must be an integer >= 1"),
    ("image_width", 3, r"set config.image_width >= 15"),
    ("model.num_heads", 0, r"config.model.num_heads=0 must be an integer >= 1"),
    ("model.num_heads", 3, r"model.width=32 must be divisible by model.num_heads=3"),
    ("model.norm", "mid", r"model.norm='mid' is not one of"),
    ("eval_splits", ("tame",), r"config.eval_splits has \['tame'\]"),
    ("keep_checkpoints", 0, r"config.keep_checkpoints=0 must be an integer >= 1"),
    ("loss.class_weights", "13:2", r"class_weights key '13'"),
    ("optimizer", "adam", r"config.optimizer='adam' is not one of"),
    ("decode.beam_size", 0, r"beam_size must be >= 1"),
    # tiny's patch embedding is 'linear': the conv stem's fields would change nothing.
    ("model.stem_depth", 1, r"config.model.stem_depth=1 shapes the 'conv' stem, which "
     r"model.patch_embedding='linear' does not have.*leave it at 0, or set "
     r"--config.model.patch_embedding=conv"),
    ("model.stem_channels", 32, r"config.model.stem_channels=32 .*leave it at 16"),
    ("model.stem_max_channels", 64, r"config.model.stem_max_channels=64 "),
])
def test_check_config_names_the_field_to_change(field, value, expected):
  config = config_lib.load("tiny")
  config.update_from_flattened_dict({field: value})
  with pytest.raises(config_lib.ConfigError, match=expected):
    config_checks.check_config(config)


def test_stem_fields_are_checked_only_with_the_linear_embedding():
  config = config_lib.load("tiny")
  config.model.stem_depth, config.model.stem_channels = 1, 32
  config.model.patch_embedding = "conv"
  config_checks.check_config(config)


# ---- Data parallelism


@pytest.mark.slow
@pytest.mark.any_device_count  # Its JAX runs in subprocesses that set their own device count.
def test_jit_and_pmap_on_8_devices_match_1_device(tmp_path, one_device_run):
  run = _run_worker(tmp_path / "run8.npz", "--parallelism=jit,pmap", devices=8)
  assert one_device_run["loss_jit"][-1] < one_device_run["loss_jit"][0] - 0.3  # It learns.
  _assert_same_run(run, one_device_run, "jit")
  _assert_same_run(run, one_device_run, "pmap")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _wait_all(procs, timeout: float) -> list[int | None]:
  """Waits for every child; when one fails or time runs out, ends the others (a process whose
  peer died would wait in a collective) and returns their exit codes (None: killed here)."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.2)
  codes = [p.poll() for p in procs]
  _kill_left(procs)
  return codes


# Every program that is new to a process costs process 1 a full compile (it never reads or
# writes JAX's compilation cache: its cache keys hold its own process), so the run keeps to few:
# one width bucket, one evaluation (greedy, as the final report reads by default) and no test
# split. A constant learning rate after warm-up makes a step's update independent of
# num_train_steps, so the run resumed at step _HOP must equal the reference trained to 2 * _HOP
# in one go.
_HOP = 10


def _distributed_run_flags(workdir, steps) -> list[str]:
  return ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.num_train_steps={steps}",
          "--config.schedule=constant", "--config.width_buckets=(48,)",
          f"--config.log_every_steps={_HOP}", f"--config.eval_every_steps={_HOP}",
          f"--config.checkpoint_every_steps={_HOP}", "--config.num_eval_examples=32",
          "--config.eval_splits=('validation',)"]


def _saved_params(workdir, step):
  """The parameters of a step's checkpoint as numpy arrays, whatever devices saved them."""
  path = workdir / "checkpoints" / str(step) / "state"
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=as_numpy)["params"]


# Report fields that differ between the layouts by design: timing and speed, the environment,
# the process count, and the confidence calibration, which each process fits on its own
# validation lines (process 0's are reported).
_PER_LAYOUT = re.compile(r"second|environment|num_processes|temperature|_ece|_coverage_at_")


@pytest.mark.slow
@pytest.mark.any_device_count  # Its JAX runs in subprocesses that set their own device count.
def test_two_processes_of_main_match_one_process(tmp_path):
  """`python -m digit_vit.main --jax_distributed` as two local processes of one CPU device:
  training with an evaluation, a checkpoint (orbax, written by both) and a report at step
  _HOP, then the same command resumes to step 2 * _HOP. The reference is one process of two
  devices trained to step 2 * _HOP at once on the same global batches (tests/joined_hosts_run.py:
  the input pipeline shares out and shuffles the training lines by process, so one process
  would train on other batches by construction). Both layouts run the same program on a
  2-device mesh: checkpoints, history and report must agree."""
  input_pipeline.get_dataset_builder(config_lib.load("tiny"))  # Built here, not by 3 children.
  two, one = tmp_path / "two", tmp_path / "one"
  logs = {}

  def start(name, command, env):
    logs[name] = tmp_path / f"{name}.log"
    with open(logs[name], "w") as log:  # A file: a full pipe would block the child.
      return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

  def tails(names):
    return "\n".join(f"--- {n}\n{logs[n].read_text()[-2000:]}" for n in names)

  # The reference runs beside the two processes, which spend much of their time waiting for
  # process 1's compiles.
  reference = start("one", [sys.executable, str(ROOT / "tests" / "joined_hosts_run.py"),
                            *_distributed_run_flags(one, 2 * _HOP)],
                    {**_env(2), "JOINED_HOSTS": "2"})
  try:
    for last_step in (_HOP, 2 * _HOP):
      port, names = _free_port(), [f"to{last_step}_process{i}" for i in range(2)]
      group = [start(name, [sys.executable, "-m", "digit_vit.main",
                            *_distributed_run_flags(two, last_step), "--jax_distributed",
                            f"--coordinator_address=localhost:{port}", "--num_processes=2",
                            f"--process_id={i}"], _env(1))
               for i, name in enumerate(names)]
      assert _wait_all(group, timeout=300) == [0, 0], tails(names)
    assert _wait_all([reference], timeout=300) == [0], tails(["one"])
  finally:
    _kill_left([reference])

  for i in range(2):
    assert f"JAX process {i} of 2" in logs[f"to{_HOP}_process{i}"].read_text()
    resumed = re.search(r"Resumed from the checkpoint of step (\d+)",
                        logs[f"to{2 * _HOP}_process{i}"].read_text())
    assert resumed and int(resumed.group(1)) == _HOP, tails([f"to{2 * _HOP}_process{i}"])
  for step in (_HOP, 2 * _HOP):
    got, want = _saved_params(two, step), _saved_params(one, step)
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    assert len(flat) > 20 and len(flat) == len(jax.tree.leaves(want))
    for (path, a), b in zip(flat, jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                 err_msg=f"step {step} {jax.tree_util.keystr(path)}")

  def history(workdir):
    return [{k: v for k, v in record.items() if k != "images_per_second"}
            for record in reporting.History(str(workdir / "history.jsonl")).load()]

  got, want = history(two), history(one)
  assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want] == [
      (_HOP, "train"), (_HOP, "validation"), (2 * _HOP, "train"), (2 * _HOP, "validation")]
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    numbers = sorted(k for k in b if k not in ("step", "split"))
    np.testing.assert_allclose([a[k] for k in numbers], [b[k] for k in numbers], rtol=1e-5,
                               err_msg=f"{b['split']} at step {b['step']}: {numbers}")

  got, want = (json.loads((w / reporting.REPORT_FILE).read_text()) for w in (two, one))
  assert (got["num_processes"], want["num_processes"]) == (2, 1)
  assert got["validation_num_examples"] == 96 and got["steps"] == 2 * _HOP
  assert got.keys() == want.keys()
  for key in sorted(want):
    if _PER_LAYOUT.search(key):
      continue
    if isinstance(want[key], float):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    else:
      assert got[key] == want[key], key


@pytest.mark.any_device_count  # jax.distributed.initialize is replaced: no devices.
def test_coordinator_flags_reach_jax_distributed_as_given(monkeypatch, capsys):
  from digit_vit import cli, main  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))

  def initialize(*args):
    flag_values = cli.parse(main, ["--config=configs/tiny.py", "--workdir=unused", *args])
    return main._initialize_distributed(flag_values)  # pylint: disable=protected-access

  assert initialize() == 0 and not calls
  assert initialize("--num_processes=2", "--process_id=1") == main.USAGE and not calls
  assert capsys.readouterr().err == (
      "error: --num_processes, --process_id given without --jax_distributed\n")
  assert initialize("--jax_distributed") == 0  # The cluster environment says the rest.
  assert initialize("--jax_distributed", "--coordinator_address=localhost:1234",
                    "--num_processes=2", "--process_id=1") == 0
  assert calls == [{}, {"coordinator_address": "localhost:1234", "num_processes": 2,
                        "process_id": 1}]


def _kill_left(procs):
  """Ends the test's children that are still running (after a failure or a timeout)."""
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


# ---- Whole runs


def _tiny(**overrides):
  config = config_lib.load("tiny")
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.slow
def test_train_and_evaluate_writes_report_and_learns(tmp_path):
  """The whole loop on the real pipeline, computing in bfloat16 on the way."""
  config = _tiny(num_train_steps=60, learning_rate=3e-3)
  config.model.dtype = "bfloat16"
  report = train.train_and_evaluate(config, str(tmp_path))
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(_params(tmp_path, 60)))
  for split in ("validation", "test"):
    for key in ("exact_match", "cer", "token_accuracy", "loss", "no_eos",
                "exact_match_length_1", "exact_match_length_3"):
      assert f"{split}_{key}" in report, key
  assert report["test_num_examples"] == 100 and report["validation_num_examples"] == 96
  assert all(0.0 <= report[f"test_{k}"] <= 1.0 for k in ("exact_match", "token_accuracy"))
  assert report["train_seconds"] > 0 and report["steps"] == 60
  # After 60 steps the model reads some tokens right: chance is about 1 in 11.
  assert report["test_token_accuracy"] > 0.12
  assert report["test_cer"] < 1.0
  on_disk = json.loads((tmp_path / reporting.REPORT_FILE).read_text())
  assert on_disk["test_exact_match"] == report["test_exact_match"]
  assert on_disk["environment"]["packages"]["jax"] == jax.__version__
  assert on_disk["environment"]["cpu"] == environment.cpu_model()
  for name in (reporting.LOSS_PLOT, reporting.ACCURACY_PLOT, reporting.READINGS_PLOT,
               "config.json"):
    assert (tmp_path / name).stat().st_size > 1000, name
  assert list(tmp_path.glob("events.out.tfevents.*"))
  history = reporting.History(str(tmp_path / "history.jsonl")).load()
  train_records = [r for r in history if r["split"] == "train"]
  assert [r["step"] for r in train_records] == list(range(5, 61, 5))
  assert train_records[-1]["loss"] < train_records[0]["loss"]
  assert {r["step"] for r in history if r["split"] == "validation"} == {15, 30, 45, 60}
  # Kept: the latest 2 (50, 60) and the best by validation exact match.
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-2:] == [50, 60] and len(steps) <= 3


@pytest.mark.slow
def test_the_final_report_reads_as_config_decode_says(tmp_path):
  """Evaluations during training stay greedy on one view; the report follows config.decode."""
  from digit_vit import evaluate  # pylint: disable=import-outside-toplevel
  # 150 steps: a model that reads lines of different lengths, so decodings can differ.
  config = _tiny(eval_splits=("test",), num_train_steps=150, learning_rate=3e-3)
  config.decode.beam_size, config.decode.views = 2, 3
  report = train.train_and_evaluate(config, str(tmp_path))
  assert (report["decode_beam_size"], report["decode_alpha"], report["decode_views"]) == (2, 0.6, 3)
  # evaluate reads the saved config's decoding by default: the same readings as the report.
  as_configured = evaluate.evaluate(tmp_path, checkpoints=["latest"], splits=["test"])
  greedy = evaluate.evaluate(tmp_path, checkpoints=["latest"], splits=["test"], beam_size=1,
                             views=1)
  assert (as_configured["beam_size"], as_configured["views"]) == (2, 3)
  for key in ("exact_match", "cer", "token_accuracy", "no_eos", "loss"):
    np.testing.assert_allclose(report[f"test_{key}"], as_configured[f"test_{key}"], rtol=1e-6,
                               err_msg=key)
  # Three views and a beam of two read this model differently from greedy on one view.
  assert report["test_cer"] != greedy["test_cer"]
  np.testing.assert_allclose(report["test_loss"], greedy["test_loss"], rtol=1e-6)


def test_a_bad_decode_config_fails_before_training(tmp_path):
  config = _tiny()
  config.decode.views = 99
  with pytest.raises(ValueError, match=r"views must be in 1\.\.25"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_checkpoints_clean(tmp_path):
  """Also runs the loop's pmap path (state to and from the pmap form at every flush)."""
  config = _tiny(optimizer="sgd", learning_rate=1e6, grad_clip_norm=0.0, warmup_steps=0,
                 log_every_steps=1, checkpoint_every_steps=1, eval_every_steps=0,
                 parallelism="pmap")
  with pytest.raises(FloatingPointError, match=r"at step (\d+)") as error:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  assert 1 <= bad_step < config.num_train_steps
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps and max(steps) == bad_step - 1
  for step in steps:  # Every checkpoint that was written holds finite parameters.
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_params(tmp_path, step)))
  assert not (tmp_path / reporting.REPORT_FILE).exists()


def _params(workdir, step):
  state = ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))
  return state["params"]


def _main_command(workdir, steps):
  return [sys.executable, "-m", "digit_vit.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.num_train_steps={steps}",
          "--config.log_every_steps=100", "--config.checkpoint_every_steps=100",
          "--config.eval_every_steps=0", "--config.eval_splits=()"]


@pytest.mark.slow
@pytest.mark.any_device_count  # Its JAX runs in subprocesses that set their own device count.
def test_sigkill_then_rerun_resumes_and_matches_uninterrupted_run(tmp_path):
  steps = 600  # About 15 s of training here, compilation included.
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  # Build the dataset once here, not in two children at the same time.
  input_module(config_lib.load("tiny")).get_dataset_builder(config_lib.load("tiny"))
  # The uninterrupted run goes on beside the killed one and its rerun.
  reference_log = tmp_path / "reference.log"
  with open(reference_log, "w") as log:  # A file: a full pipe would block the child.
    reference_proc = subprocess.Popen(_main_command(reference, steps), env=_env(), cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT)
  # The child kills itself right after writing the checkpoint of step 100 (tests/killed_run.py).
  killer = [sys.executable, str(ROOT / "tests" / "killed_run.py"),
            *_main_command(killed, steps)[3:]]
  proc = subprocess.Popen(killer, env={**_env(), "KILL_AFTER_STEP": "100"}, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    assert proc.wait(timeout=600) == -signal.SIGKILL
    assert (killed / "checkpoints" / "100").is_dir()
    assert not (killed / "checkpoints" / "200").exists()
    assert not (killed / reporting.REPORT_FILE).exists()  # Killed mid-run.

    rerun = subprocess.run(_main_command(killed, steps), env=_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = re.search(r"Resumed from the checkpoint of step (\d+)", rerun.stderr)
    assert resumed and int(resumed.group(1)) == 100, rerun.stderr[-3000:]
    assert reference_proc.wait(timeout=300) == 0, reference_log.read_text()[-3000:]
  finally:
    _kill_left([reference_proc, proc])

  got, want = _params(killed, steps), _params(reference, steps)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  report = json.loads((killed / reporting.REPORT_FILE).read_text())
  assert report["steps"] == steps and report["train_seconds"] > 0


@pytest.mark.slow
def test_classify_task_trains_through_the_same_loop(tmp_path):
  config = _tiny(task="classify", image_height=28, image_width=28, num_train_steps=60,
                 learning_rate=3e-3, eval_splits=("test",))
  config.data.name = "mnist_digits"
  config.model.patch_size = (7, 7)
  report = train.train_and_evaluate(config, str(tmp_path))
  assert report["test_num_examples"] == 1000  # The embedded test digits, each once.
  assert report["test_accuracy"] > 0.3  # Chance is 0.1.
  assert "test_exact_match" not in report and np.isfinite(report["test_loss"])
  history = reporting.History(str(tmp_path / "history.jsonl")).load()
  assert {r["step"] for r in history if r["split"] == "validation"} == {15, 30, 45, 60}
  assert (tmp_path / reporting.READINGS_PLOT).exists()


def _state_stepper_and_batch(config):
  """A fresh train state, its Stepper and one random batch of tiny.py-shaped lines."""
  mesh = state_lib.create_mesh()
  model = build_model(config)
  learning_rate_fn = state_lib.create_learning_rate_fn(config)
  state = state_lib.create_train_state(
      config, model, state_lib.create_optimizer(config, learning_rate_fn), mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((config.batch_size, 16, 48, 1), np.float32),
           "tokens": np.tile(np.int32([10, 1, 2, 11, 12]), (config.batch_size, 1))}
  return state, steps.Stepper(config, model, learning_rate_fn, mesh), batch


def test_jit_train_steps_make_no_implicit_host_transfers():
  """Inside the loop only the explicit batch upload crosses to the devices: no implicit
  host<->device copies (the state stays on device, donated from step to step)."""
  state, stepper, batch = _state_stepper_and_batch(config_lib.load("tiny"))
  state, _ = stepper(state, batch)  # Compiles outside the guard.
  old_params = state.params
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      state, step_metrics = stepper(state, batch)
  assert int(jax.device_get(state.step)) == 4
  assert old_params["decoder"]["logits"]["bias"].is_deleted()  # Donated, not copied.
  assert np.isfinite(jax.device_get(step_metrics["loss"]))


@pytest.mark.parametrize("parallelism", ["jit", "pmap"])
def test_the_step_is_a_function_of_the_state_and_the_batch(parallelism):
  """The stepper keeps nothing between calls: a fresh state steps to the same parameters after
  other steps as it did first, and a state returned by a step (pmap's per-device form) goes on
  stepping and turns back into the canonical form."""
  config = config_lib.load("tiny")
  config.parallelism = parallelism
  state, stepper, batch = _state_stepper_and_batch(config)
  fresh = functools.partial(state_lib.create_train_state, config, build_model(config),
                            state.tx, state_lib.create_mesh())
  one, _ = stepper(state, batch)
  after_one = jax.device_get(stepper.to_canonical(one).params)  # The next step donates `one`.
  two, _ = stepper(one, batch)
  assert int(jax.device_get(stepper.to_canonical(two).step)) == 2
  again, _ = stepper(fresh(), batch)
  again = stepper.to_canonical(again)
  assert int(jax.device_get(again.step)) == 1
  chex.assert_trees_all_equal(jax.device_get(again.params), after_one)


# ---- Auxiliary CTC loss


def test_ctc_weight_is_checked():
  config = config_lib.load("tiny")
  config.loss.ctc_weight = -0.1
  with pytest.raises(ValueError, match=r"ctc_weight=-0.1 must be >= 0"):
    config_checks.check_config(config)
  config.loss.ctc_weight = 0.3
  with pytest.raises(ValueError, match=r"--config.model.ctc_head=True"):
    config_checks.check_config(config)
  config.model.ctc_head = True
  config_checks.check_config(config)  # 12 columns spell any line of 3 digits.
  config.model.patch_size = (4, 16)  # 3 columns cannot spell '111' (1, blank, 1, blank, 1).
  config.width_buckets = (48,)
  with pytest.raises(ValueError, match=r"2 \* max_digits - 1 = 5 .* gives 3"):
    config_checks.check_config(config)


@pytest.mark.parametrize("parallelism", ["jit", "pmap"])
def test_ctc_loss_joins_the_objective_at_its_weight(parallelism):
  """config.loss.ctc_weight = w: the step descends (cross-entropy sum + w * CTC sum) / token
  weight, computed here by hand from the model's two outputs; the logged `loss` stays the
  cross-entropy, and `ctc_loss` is the CTC loss per line. Under pmap on several devices (the
  8-device pass of `make test`) the sums are the global batch's."""
  config = config_lib.load("tiny")
  config.parallelism = parallelism
  config.model.dropout_rate = 0.0
  # SGD: an update linear in the gradient (Adam's first step is about -lr * sign(g) whatever g
  # is). No warm-up and a large learning rate, so the step moves the parameters well beyond
  # float32 rounding.
  config.optimizer, config.warmup_steps, config.learning_rate = "sgd", 0, 1.0
  config.model.ctc_head, config.loss.ctc_weight = True, 0.5
  state, stepper, batch = _state_stepper_and_batch(config)
  batch["tokens"][::2] = [10, 7, 7, 7, 11]  # Lines '12' and '777'.
  params = jax.device_get(state.params)
  model = build_model(config)
  decoder_inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]

  @jax.jit  # Eager op-by-op dispatch of the model and its gradient took most of the test.
  def sums(p):
    logits, ctc_logits = model.apply({"params": p}, batch["image"], decoder_inputs,
                                     return_ctc=True)
    weights = losses.token_weights(targets)
    cross_entropy, weight = losses.weighted_cross_entropy(logits, targets, weights)
    ctc, lines = losses.ctc_loss(ctc_logits, batch["tokens"])
    return cross_entropy, ctc, weight, lines

  def objective(p):
    cross_entropy, ctc, weight, _ = sums(p)
    return (cross_entropy + 0.5 * ctc) / weight

  cross_entropy, ctc, weight, lines = sums(params)
  tx = state_lib.create_optimizer(config, state_lib.create_learning_rate_fn(config))
  grads = jax.grad(objective)(params)
  expected = tx.update(grads, tx.init(params), params)[0]

  state, step_metrics = stepper(state, batch)
  new_params = jax.device_get(stepper.to_canonical(state).params)
  np.testing.assert_allclose(float(step_metrics["loss"]), float(cross_entropy / weight),
                             rtol=1e-5)
  np.testing.assert_allclose(float(step_metrics["ctc_loss"]), float(ctc / lines), rtol=1e-5)
  update = jax.tree.map(lambda new, old: new - old, new_params, params)
  chex.assert_trees_all_close(update, expected, rtol=1e-3, atol=1e-6)
  # The CTC term moves the encoder, not only its own head: without it the update differs.
  plain = jax.grad(lambda p: sums(p)[0] / sums(p)[2])(params)
  encoder_gap = optax.global_norm(jax.tree.map(lambda a, b: a - b, grads["encoder"],
                                               plain["encoder"]))
  assert encoder_gap > 0.1 * optax.global_norm(plain["encoder"])
  assert optax.global_norm(plain["ctc_head"]) == 0.0


@pytest.mark.slow
def test_a_run_with_the_ctc_loss_learns_it_and_reads_from_its_checkpoint(tmp_path):
  config = _tiny(num_train_steps=100, learning_rate=3e-3)
  config.model.ctc_head, config.loss.ctc_weight = True, 0.3
  report = train.train_and_evaluate(config, str(tmp_path))
  history = reporting.History(str(tmp_path / "history.jsonl")).load()
  ctc = [r["ctc_loss"] for r in history if r["split"] == "train"]
  assert len(ctc) == 20 and ctc[-1] < 0.7 * ctc[0]
  assert "ctc_head" in _params(tmp_path, 100)
  # The saved config rebuilds the head, so `predict`, `evaluate` and the demo can restore it.
  restored = trained.load_config(tmp_path)
  assert restored.model.ctc_head and restored.loss.ctc_weight == 0.3
  params, step = trained.restore_params(tmp_path, restored, "latest")
  assert step == 100 and "ctc_head" in params
  assert report["test_token_accuracy"] > 0.2

  # Read by its CTC head instead (`config.decode.reader='ctc'`, as a run trained so saves it):
  # the evaluation step and predict both read the columns' best path.
  restored.decode.reader = "ctc"
  model = build_model(restored)
  batch = next(input_module(restored).eval_iterator(restored, "test", batch_size=16))
  _, outputs, extras = steps.eval_step(params, batch, config=restored, model=model)
  columns = model.apply({"params": params}, batch["image"], widths=batch["width"],
                        method=type(model).column_logits)
  length = min(restored.max_digits + 2, model.config.max_length)
  want, _ = decode.best_path(jax.nn.log_softmax(columns), reader_lib.ctc_frame_mask(
      model.config, batch["width"], batch["image"].shape[2]), length=length)
  np.testing.assert_array_equal(outputs, want)
  chex.assert_shape(extras["step_log_probs"], (16, length, model.config.vocab_size))
  saved = json.loads((tmp_path / "config.json").read_text())
  saved["decode"]["reader"] = "ctc"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  reader = predict.Reader(tmp_path, checkpoint="latest")
  assert reader.reader_options["reader"] == "ctc"
  image = batch["image"][0, :, :int(batch["width"][0]), 0]
  canvas = reader.prepare([image])[0]
  read, _ = decode.decode(model.config, params, canvas[None, :, :, None], reader="ctc",
                          max_length=reader.max_length)
  np.testing.assert_array_equal(reader.read([image])[0].tokens, read[0])


# ---- Moving average of the parameters


def test_update_ema_by_hand():
  ema, params = {"w": np.float32([1.0, 2.0])}, {"w": np.float32([3.0, 6.0])}
  # Step 0: the decay is capped at 1/10, so the average is mostly the new params.
  np.testing.assert_allclose(state_lib.update_ema(ema, params, 0.999, 0)["w"],
                             0.1 * ema["w"] + 0.9 * params["w"], rtol=1e-6)
  # Late in a run the configured decay holds: (1 + 10^6) / (10 + 10^6) > 0.99.
  np.testing.assert_allclose(state_lib.update_ema(ema, params, 0.99, 10**6)["w"],
                             0.99 * ema["w"] + 0.01 * params["w"], rtol=1e-6)
  config = config_lib.load("tiny")
  for bad in (1.0, -0.1):
    config.ema_decay = bad
    with pytest.raises(ValueError, match="ema_decay"):
      config_checks.check_config(config)


def test_checkpoints_from_before_the_moving_average_are_read_but_not_resumed(tmp_path):
  """A checkpoint of a TrainState without `ema_params` (written before config.ema_decay
  existed) no longer restores into today's state, so such a run cannot resume; its parameters
  still restore alone, as readers (`trained.restore_params`) take them."""
  from flax.training import train_state  # pylint: disable=import-outside-toplevel

  class OldTrainState(train_state.TrainState):
    rng: jax.Array

  state, _, _ = _state_stepper_and_batch(_tiny())
  assert state.ema_params is None
  old = OldTrainState(step=state.step, apply_fn=state.apply_fn, params=state.params,
                      tx=state.tx, opt_state=state.opt_state, rng=state.rng)
  checkpoints = checkpointing.Checkpoints(str(tmp_path / "checkpoints"), keep=1)
  try:
    checkpoints.save(7, old, {"input_position": 7, "train_seconds": 1.5})
    checkpoints.wait()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with pytest.raises(checkpointing.CorruptCheckpointError, match="step 7"):
      checkpoints.restore(abstract)
    params = checkpoints.restore_fields({"params": abstract.params}, 7)["params"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(old.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  finally:
    checkpoints.close()


@pytest.mark.slow
def test_ema_is_kept_checkpointed_and_read_with(tmp_path):
  """The train step updates the average from the new params, evaluation and reading use it."""
  from digit_vit import trained  # pylint: disable=import-outside-toplevel
  config = _tiny(num_train_steps=20, learning_rate=3e-3, ema_decay=0.9, eval_every_steps=10,
                 checkpoint_every_steps=10)
  state, stepper, batch = _state_stepper_and_batch(config)
  assert len(jax.tree.leaves(state.ema_params)) == len(jax.tree.leaves(state.params))
  for step in range(3):
    before = jax.device_get(state.ema_params)
    state, _ = stepper(state, batch)
    want = state_lib.update_ema(before, jax.device_get(state.params), 0.9, step)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.ema_params)), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert state.eval_params() is state.ema_params

  config.data.data_dir = str(tmp_path / "tfds")
  report = train.train_and_evaluate(config, str(tmp_path / "run"))
  saved = ocp.PyTreeCheckpointer().restore(str(tmp_path / "run" / "checkpoints" / "20" / "state"))
  read, step = trained.restore_params(tmp_path / "run", trained.load_config(tmp_path / "run"),
                                      "latest")
  assert step == 20
  differs = False
  for a, e, p in zip(jax.tree.leaves(read), jax.tree.leaves(saved["ema_params"]),
                     jax.tree.leaves(saved["params"])):
    np.testing.assert_allclose(np.asarray(a), e, atol=1e-7)
    differs = differs or not np.allclose(e, p)
  assert differs  # The average is not the last iterate.
  raw, _ = trained.restore_params(tmp_path / "run", trained.load_config(tmp_path / "run"),
                                  "latest", ema=False)
  for a, p in zip(jax.tree.leaves(raw), jax.tree.leaves(saved["params"])):
    np.testing.assert_allclose(np.asarray(a), p, atol=1e-7)
  # The report measured the average; evaluate measures either.
  from digit_vit import evaluate  # pylint: disable=import-outside-toplevel
  with_ema = evaluate.evaluate(tmp_path / "run", checkpoints=["latest"], splits=["test"])
  without = evaluate.evaluate(tmp_path / "run", checkpoints=["latest"], splits=["test"], ema=False)
  assert with_ema["ema"] and not without["ema"]
  np.testing.assert_allclose(with_ema["test_loss"], report["test_loss"], rtol=1e-6)
  assert abs(without["test_loss"] - report["test_loss"]) > 1e-6
