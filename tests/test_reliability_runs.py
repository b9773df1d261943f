"""Reliability of a run's directory and of `python -m digit_vit.main` (issue 47): a rerun with
another config leaves the run readable, `--checkpoint=best` is the best step in any process,
user errors are one line with exit status 2 (usage) or 1 (failure), and a damaged newest
checkpoint is named, skipped on resume and reported with the steps that still read."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from digit_vit import checkpointing, config_lib, main, state as state_lib, train, trained
from digit_vit.models import build_model

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tiny(data_dir, **overrides):
  config = config_lib.load("tiny")
  config.data.data_dir = str(data_dir)
  for key, value in overrides.items():
    config.update_from_flattened_dict({key: value})
  return config


def _files(directory: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory`."""
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def _error_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.fixture
def run_copy(tiny_workdir, tmp_path):
  """A copy of the session's tiny run (checkpoints of steps 20 and 30) to change freely."""
  copy = tmp_path / "run"
  shutil.copytree(tiny_workdir, copy)
  return copy


# ---- A rerun with another config


def test_a_rerun_with_another_config_is_refused_and_leaves_the_run_readable(run_copy, capsys):
  before = _files(run_copy)
  saved = trained.load_config(run_copy)
  config = _tiny(saved.data.data_dir, **{"model.width": 64, "learning_rate": 0.01})
  assert main.run(config, str(run_copy)) == main.USAGE
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith("error: ") and "new --workdir" in lines[0]
  assert "model.width: 32 -> 64" in lines[0] and "learning_rate: 0.0015 -> 0.01" in lines[0]
  assert _files(run_copy) == before  # config.json byte for byte, and every checkpoint file.
  params, step = trained.restore_params(run_copy, trained.load_config(run_copy), "latest")
  assert step == 30 and jax.tree.leaves(params)


# ---- Config and flag errors: one line, status 2, nothing created


@pytest.mark.parametrize("field, value, expected", [
    ("learning_rate", -1.0, "config.learning_rate=-1.0 must be a number > 0"),
    ("data.name", "bogus", "config.data.name='bogus'"),
    ("batch_size", 0, "config.batch_size=0 must be an integer >= 1"),
    ("max_digits", 0, "max_digits must be an integer >= 1"),
    ("image_width", 3, "set config.image_width >= 15"),
])
def test_a_config_error_is_one_line_with_status_2_and_creates_nothing(tmp_path, capsys, field,
                                                                      value, expected):
  config = _tiny(tmp_path / "tfds", **{field: value})
  workdir = tmp_path / "run"
  assert main.run(config, str(workdir)) == main.USAGE
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
  assert not workdir.exists()


@pytest.mark.parametrize("override, expected", [
    ("--config.modle.width=64", "no config field 'modle'"),
    ("--config.model.num_haeds=3", 'Did you mean "num_heads"'),
    ("--config.model.width=abc", "--config.model.width=abc"),
    ("--config=configs/no_such_config.py", "No such file"),
])
def test_a_flag_error_is_one_line_with_status_2(capsys, override, expected):
  argv = ["digit_vit.main", "--config=configs/tiny.py", "--workdir=unused", override]
  flag_values = flags.FlagValues()
  main.define_flags(flag_values, argv)
  with pytest.raises(SystemExit) as exit_info:
    main.parse_flags(argv, flag_values)
  assert exit_info.value.code == main.USAGE
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_an_unwritable_workdir_is_one_line_with_status_1(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  assert main.run(_tiny(tmp_path / "tfds"), str(blocker / "run")) == main.FAILURE
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: cannot write to --workdir "), err
  assert str(blocker / "run") in err


@pytest.mark.slow
@pytest.mark.any_device_count  # Its JAX runs in a subprocess.
def test_the_command_prints_a_config_error_as_its_only_line(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  result = subprocess.run(
      [sys.executable, "-m", "digit_vit.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", "--config.learning_rate=-1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      "error: config.learning_rate=-1.0 must be a number > 0 (the peak learning rate, e.g. "
      "1.5e-3)"], result.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_a_non_finite_loss_is_one_line_with_status_1(tmp_path, capsys):
  config = _tiny(tmp_path / "tfds", optimizer="sgd", learning_rate=1e6, grad_clip_norm=0.0,
                 warmup_steps=0, log_every_steps=1, eval_every_steps=0)
  assert main.run(config, str(tmp_path / "run")) == main.FAILURE
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert len(_error_lines(err)) == 1 and err.strip().splitlines()[-1].startswith(
      "error: non-finite training loss"), err[-2000:]


# ---- The best checkpoint, from a new process


def _initial_state(config):
  mesh = state_lib.create_mesh()
  model = build_model(config)
  tx = state_lib.create_optimizer(config, state_lib.create_learning_rate_fn(config))
  return state_lib.create_train_state(config, model, tx, mesh)


def _shifted(state, shift: float):
  """`state` with every parameter moved by `shift`."""
  return state.replace(params=jax.tree.map(lambda p: p + shift, state.params))


def _write_run(workdir, config, initial, scores, *, save_metrics=True, keep=1):
  """A run directory with config.json and a checkpoint for each {step: validation exact
  match} (the initial params shifted by the step), saved with its metrics or, as runs before
  the metrics were kept, without them."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  manager = checkpointing.Checkpoints(str(workdir / "checkpoints"), keep=keep,
                                      best_metric="validation_exact_match", keep_best=1)
  try:
    for step, score in scores.items():
      metrics = {"validation_exact_match": score} if save_metrics else None
      manager.save(step, _shifted(initial, step), {"input_position": step, "train_seconds": 1.0},
                   metrics)
      manager.wait()
  finally:
    manager.close()


def _steps_on_disk(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _shift(params, initial):
  """How far `params` are from the initial ones (the step `_write_run` moved them by)."""
  return float(np.mean(params["decoder"]["logits"]["bias"]
                       - np.asarray(initial.params["decoder"]["logits"]["bias"])))


def test_best_is_the_best_step_for_a_new_manager_and_keeps_being_kept(tmp_path):
  config = _tiny(tmp_path / "tfds")
  initial = _initial_state(config)
  workdir = tmp_path / "run"
  _write_run(workdir, config, initial, {10: 0.2, 20: 0.6, 30: 0.4})
  # keep=1 latest (30) and keep_best=1 best (20): 10 went.
  assert _steps_on_disk(workdir) == [20, 30]
  # A new process reads the metrics saved with each step.
  params, step = trained.restore_params(workdir, config, "best")
  assert step == 20 and _shift(params, initial) == pytest.approx(20.0)
  assert trained.restore_params(workdir, config, "latest")[1] == 30
  # A resumed run (a new manager) still ranks the old steps: step 20 outlives newer ones.
  manager = checkpointing.Checkpoints(str(workdir / "checkpoints"), keep=1,
                                      best_metric="validation_exact_match", keep_best=1)
  try:
    assert manager.best_step() == 20
    manager.save(40, _shifted(initial, 40.0), {"input_position": 40, "train_seconds": 2.0},
                 {"validation_exact_match": 0.1})
    manager.wait()
  finally:
    manager.close()
  assert _steps_on_disk(workdir) == [20, 40]


def test_reading_restores_the_parameters_alone(tmp_path):
  """A reader restores the parameters it reads with and nothing else (an orbax partial
  restore): the moving average where the run kept one, else the parameters; the optimiser
  its config names plays no part, so a config whose optimiser state has another structure
  reads the same parameters."""
  config = _tiny(tmp_path / "tfds", ema_decay=0.9)
  initial = _initial_state(config)
  averaged = initial.replace(ema_params=jax.tree.map(lambda p: p + 7.0, initial.params))
  workdir = tmp_path / "run"
  _write_run(workdir, config, averaged, {10: 0.5})  # The params moved by 10, the average by 7.
  params, step = trained.restore_params(workdir, config, "latest")
  assert step == 10 and _shift(params, initial) == pytest.approx(7.0)
  assert _shift(trained.restore_params(workdir, config, 10, ema=False)[0],
                initial) == pytest.approx(10.0)
  sgd = _tiny(tmp_path / "tfds", ema_decay=0.9, optimizer="sgd")  # No Adam moments to read.
  assert _shift(trained.restore_params(workdir, sgd, "latest")[0], initial) == pytest.approx(7.0)


def test_best_of_checkpoints_without_metrics_comes_from_the_history(tmp_path):
  """Runs from before checkpoints held their metrics: their history.jsonl ranks them."""
  config = _tiny(tmp_path / "tfds")
  workdir = tmp_path / "run"
  _write_run(workdir, config, _initial_state(config), {10: 0.0, 20: 0.0}, save_metrics=False,
             keep=2)
  with open(workdir / "history.jsonl", "w") as f:
    for step, score in ((10, 0.5), (15, 0.9), (20, 0.3)):
      f.write(json.dumps({"step": step, "split": "validation", "exact_match": score}) + "\n")
      f.write(json.dumps({"step": step, "split": "train", "exact_match": 1.0}) + "\n")
  # Step 15 scored best but has no checkpoint; of the two kept, 10 did better.
  assert _steps_on_disk(workdir) == [10, 20]
  assert trained.restore_params(workdir, config, "best")[1] == 10


# ---- A damaged newest checkpoint


def _damage(workdir, step, how):
  root = workdir / "checkpoints" / str(step)
  if how == "truncated_arrays":
    for path in (root / "state").rglob("*"):
      if path.is_file() and path.parent.name == "d":
        with open(path, "r+b") as f:
          f.truncate(10)
  else:
    (root / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how, problem", [
    ("truncated_arrays", ""),  # TensorStore's words for it vary with the file cut.
    ("missing_metadata", "state/_METADATA is missing"),
])
def test_reading_a_damaged_checkpoint_names_the_intact_steps(run_copy, how, problem):
  _damage(run_copy, 30, how)
  config = trained.load_config(run_copy)
  with pytest.raises(checkpointing.CorruptCheckpointError) as error:
    trained.restore_params(run_copy, config, "latest")
  message = str(error.value)
  assert "\n" not in message and "Traceback" not in message
  assert f"damaged checkpoint in {run_copy / 'checkpoints'} (step 30: {problem}" in message
  assert message.endswith("read an intact one instead: --checkpoint=20"), message
  assert error.value.damaged.keys() == {30} and error.value.intact == [20]
  assert trained.restore_params(run_copy, config, 20)[1] == 20  # The way forward works.


@pytest.mark.slow
def test_a_resumed_run_falls_back_to_the_newest_intact_checkpoint(run_copy, caplog):
  _damage(run_copy, 30, "truncated_arrays")
  saved = trained.load_config(run_copy)
  config = _tiny(saved.data.data_dir, eval_splits=())  # Evaluation settings may change.
  report = train.train_and_evaluate(config, str(run_copy))
  assert report["steps"] == 30
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("Checkpoint step 30" in w and "damaged" in w and "damaged_checkpoints" in w
             for w in warnings), warnings
  assert any("Resuming from step 20" in w for w in warnings), warnings
  assert (run_copy / "damaged_checkpoints" / "30" / "state").is_dir()
  assert _steps_on_disk(run_copy) == [20, 30]
  assert trained.restore_params(run_copy, trained.load_config(run_copy), "latest")[1] == 30


def test_a_run_none_of_whose_checkpoints_restore_is_not_restarted(run_copy, capsys):
  for step in (20, 30):
    _damage(run_copy, step, "missing_metadata")
  before = _files(run_copy)
  saved = trained.load_config(run_copy)
  assert main.run(_tiny(saved.data.data_dir), str(run_copy)) == main.FAILURE
  err = capsys.readouterr().err
  assert _error_lines(err)[-1].startswith("error: damaged checkpoints in ")
  assert "no intact checkpoint remains" in err and "new --workdir" in err
  after = _files(run_copy)
  assert {k: v for k, v in after.items() if k != "config.json"} == {
      k: v for k, v in before.items() if k != "config.json"}
