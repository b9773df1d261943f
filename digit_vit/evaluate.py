r"""Evaluates checkpoints of a training run on its splits, decoding greedily or by beam search.

  python -m digit_vit.evaluate --workdir=runs/long [--checkpoint=best] [--splits=test] \
      [--beam_size=4] [--alpha=0.6] [--views=5] [--num_examples=-1] [--noema] \
      [--ensemble=RUN[@CHECKPOINT],...] [--output=FILE.json]
  python -m digit_vit.evaluate --workdir=runs/long --checkpoint=10000,12000  # mean of the two
  python -m digit_vit.evaluate --workdir=runs/long --ensemble=runs/long3,runs/long4@latest

Training evaluates its last parameters greedily; this measures any kept checkpoint, the mean of
several (`--checkpoint` with commas), beam search, test-time views (`--views`), the raw
parameters of a run that kept a moving average (`--noema`), and an ensemble of runs
(`--ensemble`: every token, or a classifier's label, picked by the mean probability over the
models, and the views),
with the same metrics as `report.json` (keys prefixed by the split: `test_exact_match`,
`test_cer`, ...). The metrics are printed and written as JSON, by default to
`workdir/evaluation_<checkpoints>_beam<k>.json`.

A reader's line confidence is calibrated as training calibrates it (`calibration`): a
temperature fitted on the validation split's readings (reused when `validation` is among the
splits, else read once more), reported as `temperature` with each split's `coverage_at_98`,
`coverage_at_99`, `ece` and `ece_calibrated`, and the risk-coverage curve written beside the
JSON (`..._risk_coverage.png`). Evaluating one checkpoint of the run alone, decoded as its
config says, also stores the temperature in `workdir/calibration.json`, which `predict` and
`export` read: it then belongs to the parameters they read.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import tensorflow as tf
from absl import app, flags

from digit_vit import (calibration, cli, file_evaluation, logs, predict, state as state_lib,
                       tasks, trained)
from digit_vit.data import input_pipeline
from digit_vit.data.tasks import input_module
from digit_vit.evaluator import Evaluator
from digit_vit.models import build_model

# Printed first, in this order; every metric goes to the JSON file.
SUMMARY_KEYS = ("exact_match", "cer", "token_accuracy", "accuracy", "no_eos", "wrong_length",
                "coverage_at_98", "ece_calibrated", "num_examples")


def output_path(workdir: str | os.PathLike, checkpoints: Sequence[trained.Checkpoint],
                beam_size: int, ema: bool = True, views: int = 1,
                num_models: int = 1, prefix: str = "evaluation") -> pathlib.Path:
  """`workdir/evaluation_best_beam4.json`, `..._10000+12000_beam1.json`,
  `..._latest_beam1_views5.json`, `..._latest_beam1_noema.json` (the raw parameters of a run
  that kept a moving average), `..._best_beam1_ensemble3.json` (with 2 more runs); `prefix`
  replaces `evaluation`."""
  name = "+".join(str(c) for c in checkpoints)
  suffix = ((f"_views{views}" if views > 1 else "") + ("" if ema else "_noema")
            + (f"_ensemble{num_models}" if num_models > 1 else ""))
  return pathlib.Path(workdir) / f"{prefix}_{name}_beam{beam_size}{suffix}.json"


def reading_evaluator(workdir: str | os.PathLike, config, *,
                      checkpoints: Sequence[trained.Checkpoint], beam_size: int, alpha: float,
                      views: int, ema: bool, ensemble: Sequence[str | os.PathLike]):
  """Restores the (mean) parameters of `checkpoints` of `workdir` and the `ensemble`, and
  builds an evaluator that reads as asked (arguments as in `evaluate`, the decoding already
  resolved by `trained.decoding`; `config` is the run's).

  Returns:
    (evaluator, params, reading): `evaluator.Evaluator`, the parameters, and how they read:
    {'checkpoints', 'steps', 'beam_size', 'alpha', 'views', 'ema', 'ensemble'}.
  """
  readers, described = trained.restore_ensemble(config, ensemble, ema=ema)
  params, steps = trained.restore_average(workdir, config, checkpoints, ema=ema)
  evaluator = Evaluator(config, build_model(config), state_lib.create_mesh(),
                        input_module(config), beam_size=beam_size, alpha=alpha, views=views,
                        ensemble=readers)
  reading = {"checkpoints": [str(c) for c in checkpoints], "steps": steps,
             "beam_size": beam_size, "alpha": alpha, "views": views,
             "ema": ema and state_lib.check_ema_decay(config) > 0, "ensemble": described}
  return evaluator, params, reading


def evaluate(workdir: str | os.PathLike, *, checkpoints: Sequence[trained.Checkpoint] = ("best",),
             splits: Sequence[str] | None = None, beam_size: int | None = None,
             alpha: float | None = None, num_examples: int = -1,
             data_dir: str | None = None, ema: bool = True,
             views: int | None = None,
             ensemble: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
  """Metrics of the (mean) parameters of `checkpoints` of `workdir` on each of `splits`.

  Args:
    checkpoints: 'best', 'latest' or steps; several are averaged parameter by parameter.
    splits: default: the run's `config.eval_splits`.
    beam_size, alpha: decoding of a reader (default: the run's `config.decode`; 1 = greedy).
    views: test-time shifted views of each image whose probabilities are averaged (default:
      the run's `config.decode`; 1 = the image alone).
    num_examples: the first this many examples of each split; -1 = all.
    data_dir: where the built dataset is (default: the run's `config.data.data_dir`).
    ema: read with the moving average of the parameters where the run kept one
      (`config.ema_decay` > 0); False: the raw parameters. The same for ensemble members.
    ensemble: further runs of the same task, 'WORKDIR' (its best checkpoint) or
      'WORKDIR@CHECKPOINT', read together with `workdir`'s model on `workdir`'s data: each
      token (a classifier's label) is picked by the mean probability over the models (and
      views). Readers may differ in anything but the canvas and max_digits, classifiers in
      anything but their images and classes (`trained.check_classifier_ensemble`). The
      (teacher-forced) `loss` stays that of `workdir`'s model alone.

  Returns:
    {'checkpoints', 'steps', 'splits', 'beam_size', 'alpha', 'views', 'ema', 'ensemble',
    '<split>_<metric>', ...};
    `ema` says whether a moving average was read; `ensemble` lists the further members as
    {'workdir', 'checkpoint', 'step'}. A reader's result also has `temperature` and each
    split's `coverage_at_98`, `coverage_at_99`, `ece`, `ece_calibrated`
    (`calibration.selective_report`), and `calibration`: the record fitted (with the
    validation figures; `evaluate_and_calibrate` returns the lines too).
  """
  result, _ = evaluate_and_calibrate(
      workdir, checkpoints=checkpoints, splits=splits, beam_size=beam_size, alpha=alpha,
      num_examples=num_examples, data_dir=data_dir, ema=ema, views=views, ensemble=ensemble)
  return result


def evaluate_and_calibrate(workdir: str | os.PathLike, *,
                           checkpoints: Sequence[trained.Checkpoint] = ("best",),
                           splits: Sequence[str] | None = None, beam_size: int | None = None,
                           alpha: float | None = None, num_examples: int = -1,
                           data_dir: str | None = None, ema: bool = True,
                           views: int | None = None,
                           ensemble: Sequence[str | os.PathLike] = ()):
  """`evaluate`, and each split's readings: (result, {split: `calibration.Lines`}) (no lines
  for a classifier)."""
  config = trained.load_config(workdir)
  beam_size, alpha, views = trained.decoding(config, beam_size, alpha, views)
  splits = list(config.eval_splits if splits is None else splits)
  is_reader = tasks.get(config).reads_lines
  known = input_pipeline.SPLITS + (file_evaluation.SPLITS if is_reader else ())
  unknown = [s for s in splits if s not in known]
  if unknown or not splits:
    raise ValueError(f"--splits={','.join(splits)}: choose among {', '.join(known)}")
  if data_dir is not None:
    config.data.data_dir = data_dir
  evaluator, params, reading = reading_evaluator(
      workdir, config, checkpoints=checkpoints, beam_size=beam_size, alpha=alpha, views=views,
      ema=ema, ensemble=ensemble)
  result: dict[str, Any] = {**reading, "splits": splits}
  file_reader = None
  lines = {}
  for split in splits:
    if split in file_evaluation.SPLITS:  # Image files, read as `predict` reads them.
      if file_reader is None:
        # The ensemble the evaluator restored reads the files too.
        file_reader = predict.Reader.from_params(
            config, params, step=max(reading["steps"]), beam_size=beam_size, alpha=alpha,
            views=views, batch_size=64, ensemble=evaluator.ensemble,
            described=reading["ensemble"])
      split_metrics, lines[split] = file_evaluation.evaluate_with_lines(
          file_reader, config, split, num_examples=num_examples)
    elif is_reader:
      split_metrics, _, lines[split] = evaluator.with_lines(params, split, num_examples)
    else:
      split_metrics, _ = evaluator(params, split, num_examples)
    result.update({f"{split}_{k}": v for k, v in split_metrics.items()})
  if is_reader:
    # The temperature is fitted for exactly this reading (checkpoints, decoding, ensemble).
    validation = lines.get("validation")
    if validation is None:
      _, _, validation = evaluator.with_lines(params, "validation", num_examples)
    record, figures = calibration.selective_report(
        lines, validation, step=max(reading["steps"]),
        decoding={k: reading[k] for k in ("beam_size", "alpha", "views")})
    record.update(checkpoints=reading["checkpoints"], ema=reading["ema"],
                  ensemble=reading["ensemble"])
    result.update(figures)
    result["calibration"] = record
  return result, lines


def stores_calibration(config, result: dict[str, Any], *, ema: bool, num_examples: int,
                       beam_size: int | None, alpha: float | None,
                       views: int | None) -> bool:
  """Whether `result`'s temperature belongs in the run's `calibration.json` (the arguments
  as given to `evaluate`): it read one checkpoint of the run alone, with the parameters
  (moving average or not) and the decoding a default `predict.Reader` of the run uses, and
  fitted on the whole validation split."""
  if "calibration" not in result:
    return False
  default = trained.decoding(config)
  given = trained.decoding(config, beam_size, alpha, views)
  return (len(result["checkpoints"]) == 1 and not result["ensemble"] and ema
          and num_examples < 0 and given == default)


def format_result(result: dict[str, Any]) -> str:
  """A line of decoding settings, then one a split with its headline metrics."""
  params = "moving average" if result.get("ema") else "parameters"
  lines = [f"{params} of steps {result['steps']}, beam {result['beam_size']} "
           f"(alpha {result['alpha']}), {result.get('views', 1)} view(s)"]
  if result.get("ensemble"):
    lines[0] += ", with " + ", ".join(f"{m['workdir']} (step {m['step']})"
                                      for m in result["ensemble"])
  if "temperature" in result:
    lines[0] += f", confidence temperature {result['temperature']:.4g}"
  for split in result["splits"]:
    parts = [f"{k}={result[f'{split}_{k}']:.4g}" for k in SUMMARY_KEYS
             if f"{split}_{k}" in result]
    lines.append(f"{split}: " + "  ".join(parts))
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global."""
  cli.define_reader_flags(flag_values, model=False, several_checkpoints=True, ema=True)
  flags.DEFINE_list("splits", None, "Splits to evaluate (default: the run's config.eval_splits).",
                    flag_values=flag_values)
  flags.DEFINE_integer("num_examples", -1, "Examples of each split to evaluate; -1 = all.",
                       flag_values=flag_values)
  flags.DEFINE_string("data_dir", None, "The built dataset's directory (default: the run's "
                      "config.data.data_dir).", flag_values=flag_values)
  flags.DEFINE_string("output", None, "JSON file for the metrics (default: "
                      "workdir/evaluation_<checkpoints>_beam<k>.json).", flag_values=flag_values)


def start_reading_command(argv) -> list[trained.Checkpoint]:
  """The start of a command with `cli.define_reader_flags(several_checkpoints=True)`
  (`evaluate`, `error_analysis`): checks the command line (a mistake ends it,
  `cli.usage_error`), quiets the libraries and keeps TensorFlow off accelerators. Returns
  --checkpoint."""
  if len(argv) > 1:
    cli.usage_error(f"unexpected arguments {argv[1:]}")
  if not FLAGS.workdir:
    cli.usage_error("--workdir is required: a training run's directory")
  logs.quiet_libraries()
  tf.config.set_visible_devices([], "GPU")
  return FLAGS.checkpoint


def main(argv):
  checkpoints = start_reading_command(argv)
  # Checked before the evaluation, which can take minutes, rather than when writing its result.
  if FLAGS.output:
    problem = predict.check_output_file("--output", FLAGS.output)
    if problem:
      cli.usage_error(problem)
  elif os.path.isdir(FLAGS.workdir) and not os.access(FLAGS.workdir, os.W_OK):
    cli.usage_error(f"--workdir={FLAGS.workdir} cannot take the metrics file (no permission): "
                    f"give --output")
  try:
    result, lines = evaluate_and_calibrate(
        FLAGS.workdir, checkpoints=checkpoints, splits=FLAGS.splits, beam_size=FLAGS.beam_size,
        alpha=FLAGS.alpha, num_examples=FLAGS.num_examples, data_dir=FLAGS.data_dir,
        ema=FLAGS.ema, views=FLAGS.views, ensemble=FLAGS.ensemble)
  except (ValueError, FileNotFoundError) as e:  # A wrong run, checkpoint, split or setting.
    cli.usage_error(str(e))
  path = pathlib.Path(FLAGS.output or output_path(FLAGS.workdir, checkpoints,
                                                  result["beam_size"], FLAGS.ema,
                                                  result["views"], 1 + len(FLAGS.ensemble)))
  path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
  print(format_result(result))
  print(f"wrote {path}")
  if "temperature" in result:
    picture = calibration.plot_risk_coverage(lines, result["temperature"],
                                             risk_coverage_path(path))
    print(f"wrote {picture}")
    if stores_calibration(trained.load_config(FLAGS.workdir), result, ema=FLAGS.ema,
                          num_examples=FLAGS.num_examples, beam_size=FLAGS.beam_size,
                          alpha=FLAGS.alpha, views=FLAGS.views):
      print(f"wrote {calibration.write(FLAGS.workdir, result['calibration'])} (temperature "
            f"{result['temperature']:.4g})")
  return 0


def risk_coverage_path(json_path: str | os.PathLike) -> pathlib.Path:
  """The risk-coverage PNG beside an evaluation's JSON: `X.json` -> `X_risk_coverage.png`."""
  json_path = pathlib.Path(json_path)
  return json_path.with_name(json_path.stem + "_risk_coverage.png")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
