"""Experiments: the sweep runner (resolution, hashing, a quick sweep end to end, skipping,
collecting, failures), every sweep's conclusion on made-up rows, training on short lines only
(length generalisation), the per-epoch curves, and the ViT classifiers end to end (CIFAR-10 on
`tfds.testing.mock_data`)."""

import csv
import json
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from digit_vit import config_lib, reporting, train, trained
from digit_vit.data import classification, input_pipeline as ip
from digit_vit.models import build_model
from experiments import sweep as sweep_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SWEEPS = sorted(p.stem for p in sweep_lib.SWEEP_DIR.glob("*.py") if p.stem != "__init__")


# ---- Resolution and hashing


def test_the_issue_asks_for_these_sweeps():
  assert set(SWEEPS) >= {"patch_size", "loss", "heads", "depth", "norm", "position",
                         "patch_embedding", "length_generalization", "mnist_vit"}


@pytest.mark.parametrize("name", SWEEPS)
@pytest.mark.parametrize("quick", [False, True])
def test_every_point_of_every_sweep_resolves_to_a_buildable_config(name, quick):
  sweep = sweep_lib.load_sweep(name)
  grid = sweep.quick_grid if quick and sweep.quick_grid is not None else sweep.grid
  points = sweep_lib.points(sweep, quick=quick, workdir_root="/tmp/nowhere")
  assert [p.label for p in points] == list(grid)
  assert len({p.config_hash for p in points}) == len(points)
  for p in points:
    config = sweep_lib.resolve_config(p.config, p.overrides)
    build_model(config)  # Validates the model config: patches tile the canvas, heads divide.
    for key, value in p.varied.items():  # The point's overrides reached the config.
      node = config
      for part in key.split("."):
        node = node[part]
      assert node == value, (p.label, key)
    assert p.workdir == pathlib.Path("/tmp/nowhere") / p.config_hash
    argv = p.argv()
    assert argv[1:3] == ["-m", "digit_vit.main"] and f"--workdir={p.workdir}" in argv


def test_hash_is_of_the_resolved_config():
  base = sweep_lib.resolve_config("configs/tiny.py", {})
  same = sweep_lib.resolve_config("configs/tiny.py", {"model.num_heads": 2})  # tiny's value.
  other = sweep_lib.resolve_config("configs/tiny.py", {"model.num_heads": 4})
  digest = sweep_lib.config_hash(base.to_json_best_effort())
  assert digest == sweep_lib.config_hash(same.to_json_best_effort())
  assert digest != sweep_lib.config_hash(other.to_json_best_effort())
  # The JSON read back from a workdir's config.json hashes the same (key order is irrelevant).
  as_dict = json.loads(base.to_json_best_effort(indent=2))
  assert sweep_lib.config_hash(dict(reversed(list(as_dict.items())))) == digest
  assert len(digest) == 12 and int(digest, 16) >= 0


def test_added_fields_at_their_neutral_value_keep_the_hash():
  base = sweep_lib.resolve_config("configs/tiny.py", {})
  as_dict = json.loads(base.to_json_best_effort())
  assert as_dict["model"]["stem_depth"] == 0
  before_the_field = json.loads(base.to_json_best_effort())
  del before_the_field["model"]["stem_depth"]
  digest = sweep_lib.config_hash(as_dict)
  assert digest == sweep_lib.config_hash(before_the_field)
  deeper = sweep_lib.resolve_config("configs/tiny.py", {"model.stem_depth": 1})
  assert sweep_lib.config_hash(deeper.to_json_best_effort()) != digest


def _config_value(config: dict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def test_committed_results_are_keyed_by_their_configs():
  """Every committed full-mode point is keyed by the hash of the config it ran (its file
  name, its `config_hash` and the hash of its `resolved_config` agree, and its overrides are
  in that config), and is either a point of its sweep now or one of the frozen list of
  points measured by earlier code (`sweep.EARLIER_CODE_FILE`), whose configs predate the
  width buckets. A changed default orphans the current points (a re-run would train them
  again): a new field at a neutral value goes into sweep.ADDED_FIELDS instead."""
  results = ROOT / "experiments" / "results"
  earlier = sweep_lib.earlier_code_points()
  assert json.loads(sweep_lib.EARLIER_CODE_FILE.read_text())["code"] == "8a83775"
  checked = earlier_checked = 0
  for points_dir in sorted(results.glob("*/points")):
    sweep = sweep_lib.load_sweep(points_dir.parent.name)
    current = {p.config_hash for p in sweep_lib.points(sweep)}
    assert not current & earlier.get(sweep.name, set()), sweep.name
    for path in sorted(points_dir.glob("*.json")):
      record = json.loads(path.read_text())
      config = record["resolved_config"]
      assert record["config_hash"] == path.stem == sweep_lib.config_hash(config), path
      assert record["sweep"] == sweep.name and record["mode"] == "full", path
      assert f"--workdir=runs/sweeps/{path.stem}" in record["command"], path
      assert record["command"].startswith(f"python -m digit_vit.main --config={record['config']}")
      for key, value in record["overrides"].items():  # What the point set is what it ran.
        assert sweep_lib.flag_value(_config_value(config, key)) == sweep_lib.flag_value(value), (
            path, key)
        assert shlex.join([f"--config.{key}={sweep_lib.flag_value(value)}"]) in record["command"]
      assert record["status"] == "ok", path
      report = record["report"]
      metric = "test_accuracy" if config["task"] == "classify" else "test_exact_match"
      assert 0 <= report[metric] <= 1 and report["steps"] == config["num_train_steps"], path
      if path.stem in current:
        assert "width_buckets" in config, path
      else:
        assert path.stem in earlier.get(sweep.name, set()), (
            f"{path} matches no point of {sweep.name} and is not listed in "
            f"{sweep_lib.EARLIER_CODE_FILE.name}")
        # Measured before the width buckets: a fixed canvas, the old decoder positions.
        assert "width_buckets" not in config and "random_positions" not in config["model"]
        if config["task"] == "read":
          assert config["model"]["max_length"] == config["max_digits"] + 1, path
        earlier_checked += 1
      checked += 1
  # The frozen list names exactly the committed earlier points: none lost, none invented
  # (a sweep run again since keeps its earlier points beside its current ones).
  on_disk = {name: {p.stem for p in (results / name / "points").glob("*.json")}
             - {p.config_hash for p in sweep_lib.points(sweep_lib.load_sweep(name))}
             for name in earlier}
  assert on_disk == earlier
  assert checked >= 10 and earlier_checked == sum(map(len, earlier.values())) == 40


def test_override_values_survive_the_command_line():
  overrides = {"model.patch_size": (4, 8), "loss.ignore_pad": False, "learning_rate": 2e-3,
               "loss.class_weights": "9:2,eos:0.5,pad:0.5", "model.norm": "post",
               "eval_splits": ("test",), "data.train_max_digits": 2}
  assert sweep_lib.override_flags({"model.patch_size": (4, 8)}) == [
      "--config.model.patch_size=(4, 8)"]
  config = sweep_lib.resolve_config("configs/tiny.py", overrides)
  assert config.model.patch_size == (4, 8) and config.loss.ignore_pad is False
  assert config.learning_rate == 2e-3 and config.loss.class_weights == "9:2,eos:0.5,pad:0.5"
  assert config.model.norm == "post" and tuple(config.eval_splits) == ("test",)
  assert config.data.train_max_digits == 2
  with pytest.raises(Exception, match="modle"):
    sweep_lib.resolve_config("configs/tiny.py", {"modle.norm": "post"})


# ---- Conclusions, tables and plots from made-up results


def _fake_record(point, rng, *, status="ok"):
  """A finished point's record with plausible values for every key a sweep reads."""
  config = json.loads(sweep_lib.resolve_config(point.config, point.overrides)
                      .to_json_best_effort())
  if status != "ok":
    return {"status": status, "error": "FloatingPointError: non-finite training loss",
            "wall_seconds": 1.0}
  report = {"num_params": int(rng.integers(10_000, 2_000_000)), "steps": 100,
            "train_images_per_second": float(rng.uniform(10, 500)), "train_seconds": 60.0}
  for split in ("validation", "test"):
    n = 1000
    report[f"{split}_num_examples"] = n
    report[f"{split}_loss"] = float(rng.uniform(0.05, 2))
    report[f"{split}_images_per_second"] = float(rng.uniform(100, 2000))
    if config["task"] == "classify":
      report[f"{split}_accuracy"] = float(rng.uniform(0.5, 1))
      continue
    for key in ("exact_match", "token_accuracy", "cer"):
      report[f"{split}_{key}"] = float(rng.uniform(0, 1))
    for key in ("no_eos", "wrong_length", "order_errors"):
      report[f"{split}_{key}"] = int(rng.integers(0, 100))
    for length in range(1, config["max_digits"] + 1):
      report[f"{split}_exact_match_length_{length}"] = float(rng.uniform(0, 1))
      report[f"{split}_read_length_{length}"] = float(rng.uniform(0, length + 1))
      report[f"{split}_cer_length_{length}"] = float(rng.uniform(0.01, 1))
      report[f"{split}_num_examples_length_{length}"] = n // config["max_digits"]
  history = [{"step": s, "split": "train", "loss": 1 / s, "accuracy": 0.5} for s in (10, 20)]
  history += [{"step": 20, "split": "validation", "exact_match": 0.3, "accuracy": 0.4}]
  return {"status": "ok", "report": report, "history": history, "resolved_config": config,
          "wall_seconds": 100.0}


@pytest.mark.parametrize("name", SWEEPS)
def test_every_conclusion_writes_from_made_up_results(name, tmp_path):
  """Every sweep's conclusion hook, table and plots work on full-mode-shaped results (with
  and without a failed point), before any full run has made real ones."""
  sweep = sweep_lib.load_sweep(name)
  points = sweep_lib.points(sweep, workdir_root=tmp_path / "work")
  rng = np.random.default_rng(0)
  for failed_index in (None, len(points) - 1):
    records = {p.label: _fake_record(p, rng, status="failed" if p.index == failed_index
                                     else "ok") for p in points}
    table = sweep_lib.rows(points, records)
    text = sweep.conclusion(table)
    assert len(text) > 80, text
    if failed_index is not None:
      assert "Not finished" in text and points[failed_index].label in text
    files = sweep_lib.write_results(sweep, table, tmp_path / name, quick=False)
    md = files["md"].read_text()
    assert "## Conclusion" in md and text.strip() in md
    for p in points:
      assert f"| {p.label} |" in md and p.command() in md
    for key, path in files.items():
      assert path.stat().st_size > 500, key


def test_table_cells():
  assert sweep_lib.fmt("test_exact_match", 0.8734) == "87.3%"
  assert sweep_lib.fmt("test_exact_match_length_7", 0.5) == "50.0%"
  assert sweep_lib.fmt("test_cer", 0.0415) == "4.2%"
  assert sweep_lib.fmt("train_images_per_second", 263.4) == "263"
  assert sweep_lib.fmt("test_no_eos", 3) == "3"
  assert sweep_lib.fmt("test_read_length_8", 6.04) == "6.04"
  assert sweep_lib.fmt("wall_seconds", 90.0) == "1.5 min"
  assert sweep_lib.fmt("test_loss", float("nan")) == "-"
  assert sweep_lib.trend([0.1, 0.2, 0.2]) == "rises"
  assert sweep_lib.trend([0.3, 0.2, 0.25], tolerance=0.1) == "is flat"
  assert sweep_lib.trend([0.3, 0.2, 0.25]) == "is not monotonic"


# ---- A quick sweep end to end


def _run(*args, timeout=600):
  result = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_quick_sweep_writes_table_and_plots_then_skips_and_collects(tmp_path):
  """`python -m experiments.run norm --quick`: every point trains in its own process; the CSV,
  Markdown and PNGs come out; a re-run trains nothing; lost records are collected from the
  workdirs (as after a cluster run) without training."""
  results, work = tmp_path / "results", tmp_path / "work"
  args = ("experiments/sweeps/norm.py", "--quick", f"--results_dir={results}",
          f"--workdir_root={work}")
  out = _run(*args)
  sweep = sweep_lib.load_sweep("norm")
  labels = list(sweep.grid)
  assert out.count(": running in") == len(labels)
  folder = results / "norm"
  with open(folder / sweep_lib.RESULTS_CSV) as f:
    rows = list(csv.DictReader(f))
  assert [r["label"] for r in rows] == labels
  assert all(r["status"] == "ok" for r in rows)
  for r in rows:
    assert r["test_num_examples"] == "100" and r["steps"] == "120"  # The quick tiny runs.
    assert 0 <= float(r["test_exact_match"]) <= 1 and float(r["train_images_per_second"]) > 0
    for key in ("test_wrong_length", "test_order_errors", "test_no_eos"):
      assert 0 <= int(r[key]) <= 100
    assert float(r["test_images_per_second"]) > 0
  md = (folder / sweep_lib.RESULTS_MD).read_text()
  assert "## Conclusion" in md and "Pre-LN reaches" in md and "--quick" in md
  assert all(f"| {label} | `model.norm=" in md for label in labels)
  for png in ("metrics.png", "by_length.png", "curves.png"):
    assert (folder / png).stat().st_size > 5000, png
    assert f"]({png})" in md
  records = sorted((folder / sweep_lib.POINTS).glob("*.json"))
  assert len(records) == len(labels)
  record = json.loads(records[0].read_text())
  assert record["command"].startswith("python -m digit_vit.main --config=configs/tiny.py")
  assert record["config_hash"] == records[0].stem and record["history"]
  for r in rows:
    assert (work / r["config_hash"] / "report.json").exists()

  again = _run(*args)
  assert again.count("skipped") == len(labels) and "running" not in again

  for path in records:  # As if the points had run elsewhere: only the workdirs are left.
    path.unlink()
  collected = _run(*args, "--collect_only")
  assert collected.count("collected from") == len(labels) and "running" not in collected
  assert len(list((folder / sweep_lib.POINTS).glob("*.json"))) == len(labels)


@pytest.mark.slow
def test_failed_point_is_recorded_skipped_and_retried(tmp_path):
  """A point whose child fails (here: 3 heads do not divide the tiny width of 32, which the
  child finds when it builds the model) is a 'failed' row, skipped on a re-run until
  --retry_failed; the other point still runs and is tabulated."""
  sweep_file = tmp_path / "broken.py"
  sweep_file.write_text(
      "from experiments import sweep\n"
      "SWEEP = sweep.Sweep(name='broken', title='t', question='q', base='tiny', quick={},\n"
      "    grid={'fine': {'num_train_steps': 4}, 'three heads': {'model.num_heads': 3}},\n"
      "    fixed={'eval_every_steps': 0, 'checkpoint_every_steps': 4, 'num_train_steps': 4})\n")
  args = (str(sweep_file), f"--results_dir={tmp_path / 'results'}",
          f"--workdir_root={tmp_path / 'work'}")
  out = _run(*args)
  # A bad config value is a usage error: digit_vit.main prints one line and exits with 2.
  assert "failed (exit 2)" in out and "num_heads" in out
  with open(tmp_path / "results" / "broken" / sweep_lib.RESULTS_CSV) as f:
    rows = {r["label"]: r for r in csv.DictReader(f)}
  assert rows["fine"]["status"] == "ok" and rows["three heads"]["status"] == "failed"
  md = (tmp_path / "results" / "broken" / sweep_lib.RESULTS_MD).read_text()
  assert "| three heads | `model.num_heads=3` | failed: " in md
  assert _run(*args).count("skipped") == 2
  retried = _run(*args, "--retry_failed")
  assert retried.count("skipped") == 1 and retried.count("failed (exit 2)") == 1


def test_dry_run_prints_commands_and_writes_nothing(tmp_path, capsys):
  """The commands a scheduler would run; the costly 4x4 point only with --costly."""
  from digit_vit import cli  # pylint: disable=import-outside-toplevel
  from experiments import run  # pylint: disable=import-outside-toplevel
  args = ["patch_size", "--dry_run", f"--results_dir={tmp_path}",
          f"--workdir_root={tmp_path / 'work'}", "--set=num_train_steps=7"]
  sweep = sweep_lib.load_sweep("patch_size")
  assert sweep.costly == ("4x4",)
  for extra, expected in (([], len(sweep.grid) - 1), (["--costly"], len(sweep.grid))):
    assert cli.call(run, args + extra) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("python -m digit_vit.main")]
    assert len(lines) == expected
    assert all("--config.num_train_steps=7" in line
               and "--config=configs/experiment.py" in line for line in lines)
    assert ("'--config.model.patch_size=(4, 4)'" in lines[0]) == bool(extra)
    assert ("4x4 (" in out and "costly, not run" in out) == (not extra)
  assert not any(tmp_path.iterdir())


# ---- Length generalisation: training on short lines only


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  config = config_lib.load("tiny")  # 512 train lines of 1-3 digits.
  config.batch_size = 32
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  ip.get_dataset_builder(config)
  return config


def test_train_max_digits_keeps_longer_lines_out_of_training_only(tiny):
  config = config_lib.load("tiny")
  config.update_from_flattened_dict({"batch_size": 32, "data.data_dir": tiny.data.data_dir})
  it = ip.train_iterator(config, seed=0, process_index=0, process_count=1)
  all_lengths = np.concatenate([next(it)["length"] for _ in range(20)])
  assert set(all_lengths.tolist()) == {1, 2, 3}
  config.data.train_max_digits = 2
  it = ip.train_iterator(config, seed=0, process_index=0, process_count=1)
  lengths = np.concatenate([next(it)["length"] for _ in range(40)])  # 1280 > 1 epoch.
  assert set(lengths.tolist()) == {1, 2}
  n_short = ip.num_examples(config, "train")
  assert n_short == int(np.sum(_split_lengths(config, "train") <= 2)) and 0 < n_short < 512
  assert ip.num_examples(config, "test") == 100  # Evaluation keeps every length ...
  test_lengths = np.concatenate([b["length"][b["mask"]] for b in ip.eval_iterator(
      config, "test", process_index=0, process_count=1)])
  assert test_lengths.max() == 3  # ... the longer lines included.
  # With a curriculum, lengths grow up to the training limit, not to max_digits.
  config.data.curriculum_examples = 320
  config.data.train_max_digits = 1
  it = ip.train_iterator(config, seed=0, process_index=0, process_count=1)
  assert set(np.concatenate([next(it)["length"] for _ in range(15)]).tolist()) == {1}
  config.data.train_max_digits = 4
  with pytest.raises(ValueError, match="train_max_digits=4 must be in 0..max_digits=3"):
    ip.train_iterator(config, seed=0, process_index=0, process_count=1)


def _split_lengths(config, split):
  return np.concatenate([b["length"][b["mask"]] for b in ip.eval_iterator(
      config, split, batch_size=64, process_index=0, process_count=1)])


def test_length_generalization_config():
  config = config_lib.load("length_generalization")
  # The default's model and reading without its CTC head (the sweep's base point).
  default = config_lib.read_by_the_decoder_alone(config_lib.load("default"))
  # Training lines of 1-6 digits; the splits (and their evaluation) keep 1-12.
  assert config.data.train_max_digits == 6 and config.max_digits == 12
  assert ip.train_max_digits(config) == 6 and ip.train_max_digits(default) == 16
  assert default.data.train_max_digits == 0  # Unchanged default: every length.
  # Besides the lines' lengths, only training differs from the default: the same composition,
  # canvas and model.
  for key in ("image_height", "image_width", "width_buckets", "model", "decode"):
    assert config[key] == default[key], key
  assert config.data.digit_elastic == default.data.digit_elastic
  # The decoder reads up to decode.max_length digits, well past the 12 of the longest line,
  # and randomized positions train all model.max_length positions on the 1-6 digit lines.
  assert config.decode.max_length == 32 and config.model.max_length == 33
  assert trained.read_length(config) == 33  # 32 digits and <eos>: every decoder position.
  assert config.decode.max_length > config.max_digits and config.model.random_positions
  assert config.image_width == max(config.width_buckets) == 1024
  build_model(config)


# ---- Per-epoch curves and the classifiers


def test_epoch_means_by_hand():
  history = [{"step": s, "split": "train", "loss": float(s)} for s in range(10, 101, 10)]
  history.append({"step": 50, "split": "validation", "loss": 0.5})
  # 30 steps an epoch: (0, 30] -> 10, 20, 30; (30, 60] -> 40, 50, 60; ...; 100 -> epoch 4,
  # unfinished, drawn at 100 / 30.
  epochs, means = reporting.epoch_means(history, "train", "loss", 30.0)
  np.testing.assert_allclose(epochs, [1, 2, 3, 100 / 30])
  np.testing.assert_allclose(means, [20, 50, 80, 100])
  assert reporting.epoch_means(history, "validation", "accuracy", 30.0) == ([], [])


@pytest.mark.slow
def test_mnist_vit_reports_held_out_test_accuracy_and_epoch_curves(tmp_path):
  config = config_lib.load("mnist_vit")
  config.update_from_flattened_dict({
      "num_train_steps": 56, "warmup_steps": 5, "eval_every_steps": 28, "log_every_steps": 7,
      "checkpoint_every_steps": 56, "eval_batch_size": 200, "progress_bar": False,
      "learning_rate": 3e-3})
  report = train.train_and_evaluate(config, str(tmp_path))
  assert report["test_num_examples"] == 1000  # Rows 400-499 of each class, each once.
  assert report["validation_num_examples"] == 400
  assert report["test_accuracy"] > 0.3  # Chance is 0.1; two epochs of 3,600 digits.
  history = reporting.History(str(tmp_path / "history.jsonl")).load()
  assert {r["step"] for r in history if r["split"] == "validation"} == {28, 56}
  assert (tmp_path / reporting.EPOCH_PLOT).stat().st_size > 5000


@pytest.mark.slow
def test_cifar10_vit_end_to_end_with_mock_data(tmp_path):
  """configs/cifar10_vit.py, shrunk, through train_and_evaluate on TFDS mock data: the seeds'
  augmentations, a report with test accuracy, and the loss/accuracy curves per epoch."""
  config = config_lib.load("cifar10_vit")
  assert config.data.random_crop_padding == 4 and config.data.horizontal_flip
  assert tuple(config.data.mean) == classification.CIFAR10_MEAN
  assert tuple(config.data.std) == classification.CIFAR10_STD
  assert config.model.class_token and config.model.image_channels == 3
  config.update_from_flattened_dict({
      "batch_size": 16, "eval_batch_size": 16, "num_train_steps": 10, "warmup_steps": 2,
      "log_every_steps": 1, "eval_every_steps": 5, "checkpoint_every_steps": 10,
      "progress_bar": False, "data.validation_size": 10, "model.width": 32,
      "model.num_heads": 2, "model.mlp_dim": 64, "model.encoder_layers": 1})
  classification._CACHE.clear()  # pylint: disable=protected-access
  try:
    with tfds.testing.mock_data(num_examples=50):
      report = train.train_and_evaluate(config, str(tmp_path))
  finally:
    classification._CACHE.clear()  # pylint: disable=protected-access
  assert report["test_num_examples"] == 50 and report["validation_num_examples"] == 10
  assert 0.0 <= report["test_accuracy"] <= 1.0 and np.isfinite(report["test_loss"])
  assert report["steps"] == 10 and report["train_images_per_second"] > 0
  history = reporting.History(str(tmp_path / "history.jsonl")).load()
  # 40 training images / 16 = 2.5 steps an epoch: 10 steps are 4 epochs.
  epochs, _ = reporting.epoch_means(history, "train", "loss", 40 / 16)
  np.testing.assert_allclose(epochs, [1, 2, 3, 4])
  for name in (reporting.EPOCH_PLOT, reporting.LOSS_PLOT, reporting.ACCURACY_PLOT,
               reporting.READINGS_PLOT):
    assert (tmp_path / name).stat().st_size > 5000, name
