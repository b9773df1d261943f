"""evaluate: a checkpoint's metrics reproduce the run's report; beam search and checkpoint
averaging; errors that say what to change; the command line."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import ml_collections
import numpy as np
import pytest

from digit_vit import calibration, decode, evaluate, metrics, trained
from digit_vit.data import classification, input_pipeline
from digit_vit.models import ModelConfig, ViTClassifier, tokens

ROOT = pathlib.Path(__file__).resolve().parent.parent
# tiny.py checkpoints every 10 of its 30 steps and keeps the last two.
KEPT_STEPS = [20, 30]


def _report(workdir):
  return json.loads((pathlib.Path(workdir) / "report.json").read_text())


@pytest.mark.slow
def test_greedy_evaluation_of_the_last_checkpoint_reproduces_the_report(tiny_workdir):
  result = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], beam_size=1)
  report = _report(tiny_workdir)
  assert result["steps"] == [30] and result["splits"] == ["validation", "test"]
  for split in ("validation", "test"):
    for key in ("exact_match", "cer", "token_accuracy", "loss", "num_examples", "no_eos",
                "wrong_length", "exact_match_length_3"):
      np.testing.assert_allclose(result[f"{split}_{key}"], report[f"{split}_{key}"],
                                 rtol=1e-6, err_msg=f"{split}_{key}")
  # The same readings of the same validation lines: the same temperature and figures.
  np.testing.assert_allclose(result["temperature"], report["temperature"], rtol=1e-5)
  for split in ("validation", "test"):
    for key in ("coverage_at_98", "coverage_at_99", "ece", "ece_calibrated"):
      np.testing.assert_allclose(result[f"{split}_{key}"], report[f"{split}_{key}"],
                                 rtol=1e-4, atol=1e-7, err_msg=f"{split}_{key}")


@pytest.mark.slow
def test_beam_search_changes_only_the_free_running_metrics(tiny_workdir):
  greedy = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test"],
                             beam_size=1)
  beam = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test"],
                           beam_size=3, alpha=0.0)
  assert (beam["beam_size"], beam["alpha"]) == (3, 0.0)
  # The teacher-forced loss does not depend on decoding; the readings may.
  np.testing.assert_allclose(beam["test_loss"], greedy["test_loss"], rtol=1e-6)
  assert beam["test_num_examples"] == greedy["test_num_examples"] == 100
  assert 0.0 <= beam["test_exact_match"] <= 1.0 and 0.0 <= beam["test_cer"]


@pytest.mark.slow
def test_averaged_checkpoints_are_the_mean_of_their_parameters(tiny_workdir):
  config = trained.load_config(tiny_workdir)
  first, step_a = trained.restore_params(tiny_workdir, config, KEPT_STEPS[0])
  second, step_b = trained.restore_params(tiny_workdir, config, KEPT_STEPS[1])
  mean, steps = trained.restore_average(tiny_workdir, config, KEPT_STEPS)
  assert (step_a, step_b, steps) == (20, 30, KEPT_STEPS)
  differences = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), first, second)
  assert max(jax.tree.leaves(differences)) > 0  # Training moved them: the mean is new.
  jax.tree.map(lambda m, a, b: np.testing.assert_allclose(m, (a + b) / 2, rtol=1e-6, atol=1e-7),
               mean, first, second)
  averaged = evaluate.evaluate(tiny_workdir, checkpoints=KEPT_STEPS, splits=["test"])
  assert averaged["steps"] == KEPT_STEPS and averaged["checkpoints"] == ["20", "30"]


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoints": [7]}, "no checkpoint of step 7"),
    ({"checkpoints": ["latest", 30]}, "more than once"),
    ({"checkpoints": []}, "at least one checkpoint"),
    ({"splits": ["tset"]}, "choose among train, validation, test"),
    ({"beam_size": 0}, "beam_size must be >= 1"),
])
def test_bad_requests_name_what_to_change(tiny_workdir, kwargs, message):
  with pytest.raises(ValueError, match=message):
    evaluate.evaluate(tiny_workdir, **kwargs)


def test_beam_search_on_a_classifier_run_is_an_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"task": "classify"}))
  with pytest.raises(ValueError, match="beam search only applies to readers"):
    evaluate.evaluate(tmp_path, beam_size=4)


@pytest.mark.parametrize("decode_config, given, expected", [
    ({"beam_size": 4, "alpha": 0.3, "views": 5}, (None, None, None), (4, 0.3, 5)),  # The run's.
    ({"beam_size": 4, "alpha": 0.3, "views": 5}, (1, 0.0, 1), (1, 0.0, 1)),  # Given values win.
    ({"beam_size": 4, "alpha": 0.3}, (None, None, None), (4, 0.3, 1)),  # Saved before views.
    (None, (None, None, None), (1, 0.6, 1)),                 # Runs saved before config.decode.
])
def test_predict_and_evaluate_share_one_decoding_rule(decode_config, given, expected):
  config = ml_collections.ConfigDict({"task": "read"})
  if decode_config is not None:
    config.decode = decode_config
  assert trained.decoding(config, *given) == expected


def test_a_beam_of_zero_is_an_error_not_the_configs_default():
  config = ml_collections.ConfigDict({"task": "read", "decode": {"beam_size": 4, "alpha": 0.6}})
  with pytest.raises(ValueError, match="beam_size must be >= 1"):
    trained.decoding(config, beam_size=0)
  for views in (0, 26):
    with pytest.raises(ValueError, match=r"views must be in 1\.\.25"):
      trained.decoding(config, views=views)
  classifier = ml_collections.ConfigDict({"task": "classify"})
  with pytest.raises(ValueError, match="leave beam_size at 1"):
    trained.decoding(classifier, beam_size=2)
  assert trained.decoding(classifier, views=3) == (1, 0.6, 3)  # Labels over 3 views.


@pytest.mark.slow
def test_views_change_only_the_free_running_metrics(tiny_workdir):
  single = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test"], views=1)
  viewed = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test"], views=5,
                             beam_size=2)
  assert (viewed["views"], viewed["beam_size"], single["views"]) == (5, 2, 1)
  np.testing.assert_allclose(viewed["test_loss"], single["test_loss"], rtol=1e-6)
  assert viewed["test_num_examples"] == 100
  assert 0.0 <= viewed["test_exact_match"] <= 1.0 and 0.0 <= viewed["test_cer"]


def test_a_directory_without_a_run_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="must be a training run's directory"):
    evaluate.evaluate(tmp_path)


def test_output_names_say_which_checkpoints_and_beam():
  assert evaluate.output_path("runs/x", ["best"], 4) == pathlib.Path(
      "runs/x/evaluation_best_beam4.json")
  assert evaluate.output_path("runs/x", [20, 30], 1).name == "evaluation_20+30_beam1.json"
  assert evaluate.output_path("runs/x", ["latest"], 1, ema=False).name == (
      "evaluation_latest_beam1_noema.json")
  assert evaluate.output_path("runs/x", ["best"], 4, views=5).name == (
      "evaluation_best_beam4_views5.json")
  assert evaluate.output_path("runs/x", ["best"], 1, num_models=3).name == (
      "evaluation_best_beam1_ensemble3.json")


@pytest.mark.slow
def test_command_line_prints_and_writes_the_metrics(tiny_workdir):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "digit_vit.evaluate", f"--workdir={tiny_workdir}",
       "--checkpoint=20,30", "--splits=test", "--beam_size=2"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  path = pathlib.Path(tiny_workdir) / "evaluation_20+30_beam2.json"
  written = json.loads(path.read_text())
  assert written["steps"] == KEPT_STEPS and written["beam_size"] == 2
  assert f"test: exact_match={written['test_exact_match']:.4g}" in result.stdout
  # Calibrated on the validation split for this reading; the picture beside the JSON; the
  # run's own calibration (of its last step, greedy) left as training wrote it.
  assert f"confidence temperature {written['temperature']:.4g}" in result.stdout
  assert written["calibration"]["step"] == 30
  assert written["calibration"]["decode"]["beam_size"] == 2
  assert 0.0 <= written["test_coverage_at_98"] <= 1.0 and "test_ece_calibrated" in written
  assert (pathlib.Path(tiny_workdir) / "evaluation_20+30_beam2_risk_coverage.png").is_file()
  assert calibration.load_temperature(tiny_workdir) == _report(tiny_workdir)["temperature"]
  bad = subprocess.run(
      [sys.executable, "-m", "digit_vit.evaluate", f"--workdir={tiny_workdir}",
       "--checkpoint=first"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert bad.returncode != 0 and "use 'best', 'latest' or a step number" in bad.stderr
  together = subprocess.run(
      [sys.executable, "-m", "digit_vit.evaluate", f"--workdir={tiny_workdir}",
       "--checkpoint=latest", "--splits=test", f"--ensemble={tiny_workdir}@20"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert together.returncode == 0, together.stderr[-2000:]
  written = json.loads((pathlib.Path(tiny_workdir)
                        / "evaluation_latest_beam1_ensemble2.json").read_text())
  assert written["ensemble"] == [{"workdir": str(tiny_workdir), "checkpoint": "20", "step": 20}]
  assert f"with {tiny_workdir} (step 20)" in together.stdout


# ---- Ensembles of runs


@pytest.mark.slow
def test_an_ensemble_of_a_run_with_itself_reads_as_the_run_alone(tiny_workdir):
  alone = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test"])
  twice = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test"],
                            ensemble=[f"{tiny_workdir}@latest"])
  assert twice["ensemble"] == [{"workdir": str(tiny_workdir), "checkpoint": "latest",
                                "step": 30}]
  assert alone["ensemble"] == []
  for key in ("exact_match", "cer", "token_accuracy", "loss", "no_eos", "num_examples"):
    np.testing.assert_allclose(twice[f"test_{key}"], alone[f"test_{key}"], rtol=1e-6,
                               err_msg=key)


@pytest.mark.slow
def test_an_ensemble_of_two_checkpoints_scores_their_joint_reading(tiny_workdir):
  """The evaluation's metrics are those of decoding the test lines with both parameter sets
  directly, and its loss is the first model's alone."""
  config = trained.load_config(tiny_workdir)
  latest, _ = trained.restore_params(tiny_workdir, config, "latest")
  earlier, _ = trained.restore_params(tiny_workdir, config, KEPT_STEPS[0])
  result = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test"],
                             ensemble=[f"{tiny_workdir}@{KEPT_STEPS[0]}"])
  alone = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test"])
  model_config = ModelConfig.from_config(config.model)
  total, differ = None, 0
  for batch in input_pipeline.eval_iterator(config, "test", process_index=0, process_count=1):
    outputs, log_prob = decode.greedy_decode((model_config, model_config), (latest, earlier),
                                             batch["image"], widths=batch["width"],
                                             max_length=config.max_digits + 2)
    _, alone_log_prob = decode.greedy_decode(model_config, latest, batch["image"],
                                             widths=batch["width"],
                                             max_length=config.max_digits + 2)
    differ += int((np.abs(np.asarray(log_prob) - np.asarray(alone_log_prob)) > 1e-3)[
        batch["mask"]].sum())
    _, targets = tokens.split_decoder_io(batch["tokens"])
    total = metrics.add_sums(total, jax.device_get(metrics.reading_sums(
        outputs, targets, batch["mask"], max_digits=config.max_digits)))
  expected = metrics.summarize(total)
  assert result["test_num_examples"] == expected["num_examples"] == 100
  for key in ("exact_match", "cer", "token_accuracy", "no_eos", "wrong_length"):
    np.testing.assert_allclose(result[f"test_{key}"], expected[key], rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(result["test_loss"], alone["test_loss"], rtol=1e-6)
  assert result["ensemble"][0]["step"] == KEPT_STEPS[0]
  # The two checkpoints read the lines with other probabilities together than the latest alone
  # (so an ensemble that was dropped would fail above).
  assert differ > 50


@pytest.mark.slow
def test_an_ensemble_member_that_cannot_read_along_is_an_error(tiny_workdir, tmp_path):
  saved = json.loads((pathlib.Path(tiny_workdir) / "config.json").read_text())
  saved["model"]["image_height"] = saved["model"]["image_height"] * 2
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="member 1 has model.image_height"):
    evaluate.evaluate(tiny_workdir, ensemble=[tmp_path])
  with pytest.raises(FileNotFoundError, match="must be a training run's directory"):
    evaluate.evaluate(tiny_workdir, ensemble=[tmp_path / "missing"])
  with pytest.raises(ValueError, match="use 'best', 'latest' or a step number"):
    evaluate.evaluate(tiny_workdir, ensemble=[f"{tiny_workdir}@first"])
  with pytest.raises(ValueError, match="no checkpoint of step 7"):
    evaluate.evaluate(tiny_workdir, ensemble=[f"{tiny_workdir}@7"])


def _shifted(images, dy, dx):
  """images [b, H, W, C] moved dy rows down and dx columns right, the edges filled with 0."""
  out = np.zeros_like(images)
  h, w = images.shape[1:3]
  out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


@pytest.mark.slow
@pytest.mark.parametrize("members, views", [(1, 1), (2, 1), (1, 5), (2, 3)])
def test_a_classifier_labels_by_the_mean_probability_of_its_models_and_views(
    classifier_workdir, members, views):
  """Its accuracy is that of the mean softmax over the parameter sets and the shifted images,
  computed directly; its loss is the first model's on the image alone."""
  config = trained.load_config(classifier_workdir)
  param_sets = [trained.restore_params(classifier_workdir, config, step)[0]
                for step in ("latest", 50)[:members]]
  result = evaluate.evaluate(classifier_workdir, checkpoints=["latest"], splits=["test"],
                             ensemble=[f"{classifier_workdir}@50"] * (members - 1), views=views)
  alone = evaluate.evaluate(classifier_workdir, checkpoints=["latest"], splits=["test"])
  assert result["views"] == views and len(result["ensemble"]) == members - 1
  model = ViTClassifier(ModelConfig.from_config(config.model))
  correct = count = changed = 0
  for batch in classification.eval_iterator(config, "test", process_index=0, process_count=1):
    probabilities = np.mean([
        jax.nn.softmax(model.apply({"params": p}, _shifted(batch["image"], dy, dx)))
        for p in param_sets for dy, dx in decode.VIEW_SHIFTS[:views]], axis=0)
    chex.assert_shape(probabilities, (config.eval_batch_size, 10))
    first = jax.nn.softmax(model.apply({"params": param_sets[0]}, batch["image"]))
    labels = np.argmax(probabilities, axis=-1)[batch["mask"]]
    correct += int((labels == batch["label"][batch["mask"]]).sum())
    count += int(batch["mask"].sum())
    changed += int((labels != np.argmax(first, axis=-1)[batch["mask"]]).sum())
  assert result["test_num_examples"] == count == 1000
  assert result["test_accuracy"] == pytest.approx(correct / count)
  np.testing.assert_allclose(result["test_loss"], alone["test_loss"], rtol=1e-6)
  # Further models or views label some digits otherwise than the latest alone.
  assert (changed > 0) == (members > 1 or views > 1)


@pytest.mark.slow
def test_a_classifier_ensemble_member_must_see_the_same_images_and_classes(classifier_workdir,
                                                                           tiny_workdir,
                                                                           tmp_path):
  saved = json.loads((pathlib.Path(classifier_workdir) / "config.json").read_text())
  for section, field, value in (("model", "num_classes", 100), ("data", "std", [0.3]),
                                ("model", "image_width", 32)):
    changed = json.loads(json.dumps(saved))
    changed[section][field] = value
    (tmp_path / "config.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=f"member 1 has {section}.{field}="):
      evaluate.evaluate(classifier_workdir, ensemble=[tmp_path])
  with pytest.raises(ValueError, match="trained a config.task='read' model; this needs a "
                                       "'classify' model"):
    evaluate.evaluate(classifier_workdir, ensemble=[tiny_workdir])
  with pytest.raises(ValueError, match="trained a config.task='classify' model; this needs a "
                                       "'read' model"):
    evaluate.evaluate(tiny_workdir, ensemble=[classifier_workdir])


@pytest.mark.parametrize("spec, expected", [
    ("runs/a", ("runs/a", "best")),
    ("runs/a@latest", ("runs/a", "latest")),
    ("runs/a@1200", ("runs/a", 1200)),
    ("/tmp/x@y/run@best", ("/tmp/x@y/run", "best")),
])
def test_ensemble_members_name_a_run_and_optionally_its_checkpoint(spec, expected):
  assert trained.parse_member(spec) == expected
  with pytest.raises(ValueError, match="WORKDIR or WORKDIR@CHECKPOINT"):
    trained.parse_member("@best")


def test_the_commands_import_into_one_process():
  # absl flags are global: predict and evaluate both defined --workdir on import, which broke
  # collecting these tests after predict's; main and bench both defined --config.
  for name in ("main", "bench", "predict", "evaluate"):
    importlib.import_module(f"digit_vit.{name}")
