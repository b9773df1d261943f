"""Training and evaluation: `train_and_evaluate(config, workdir)`, the loop.

The loop steps (`steps.Stepper`) through the input module's training batches, logs, evaluates
on validation (`evaluator.Evaluator`) and checkpoints (`checkpointing.Checkpoints`) as the
config says, then reads every split of `config.eval_splits` for the report. The pieces live
apart: the config checks in `config_checks`, the state, optimiser and moving average in
`state`, the loss and the compiled steps in `steps`, evaluation in `evaluator`.

The canonical state is the jit form (replicated global arrays): evaluation and checkpoints use
it, and under pmap the loop converts the stepper's per-device state back to it
(`Stepper.to_canonical`) before each evaluation or checkpoint.

Randomness: dropout at step t uses fold_in(state.rng, t) (`steps.train_step`), so a resumed run
draws exactly what an uninterrupted one would; the input order is the pipeline's, resumed with
`start_step`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from absl import logging

from digit_vit import (calibration, checkpointing, config_checks, config_lib, environment,
                       file_evaluation, metrics, predict, reporting, state as state_lib, steps,
                       tasks, trained)
from digit_vit.data.tasks import input_module
from digit_vit.evaluator import Evaluator
from digit_vit.models import build_model


def _check_finite(step: int, step_metrics: dict[str, float], latest_checkpoint):
  if not (math.isfinite(step_metrics["loss"]) and math.isfinite(step_metrics["grad_norm"])):
    raise FloatingPointError(
        f"non-finite training loss {step_metrics['loss']} (gradient norm "
        f"{step_metrics['grad_norm']}) at step {step}; training stopped and this state was not "
        f"checkpointed (latest checkpoint: step {latest_checkpoint}). Lower "
        "config.learning_rate, raise config.warmup_steps or set config.grad_clip_norm.")


def _has_checkpoints(directory: str) -> bool:
  """Whether a checkpoint directory holds a step (intact or not)."""
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _write_config(workdir: str, config) -> None:
  """Writes `workdir/config.json` (creating the workdir) through a temporary file renamed into
  place, so a kill mid-write never leaves a run without a readable config.

  Raises:
    OSError: the workdir cannot be created or written, saying which.
  """
  path = os.path.join(workdir, "config.json")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)
  except OSError as error:
    # The same OSError subclass, with a message that names the workdir once.
    raise type(error)(f"cannot write to --workdir {workdir}: "
                      f"{error.strerror or error}") from error


# ----------------------------------------------------------------------------------------------
# The loop


def _read_splits(config, params, read: Evaluator, reading: trained.Decoding, writer, step: int,
                 last_validation=None):
  """Reads every split of `config.eval_splits` with the final parameters for the report:
  dataset splits with `read`, image files (`file_evaluation.SPLITS`) as `predict` reads them.

  Args:
    params: the final parameters to read with, replicated global arrays.
    read: the evaluator that decodes as `reading` (the run's `config.decode`) says.
    step: the step the scalars are written at (the last).
    last_validation: the `calibration.Lines` of the last periodic validation where it decoded
      as `read` does, else None.

  Returns:
    (figures {'<split>_<metric>': value}, sample: this process's first batch of the test split
    (else of the first split) for pictures, or None; lines {split: `calibration.Lines`} of a
    reader's splits; validation: the `calibration.Lines` to fit the confidence temperature on,
    or None for a classifier and for a run that asked for no final evaluation).
  """
  figures, sample, file_reader, lines = {}, None, None, {}
  reads_lines = tasks.get(config).reads_lines
  for split in config.eval_splits:
    if split in file_evaluation.SPLITS:  # Image files, read as `predict` reads them.
      if file_reader is None:
        # Every process reads the files whole on its own devices, from its copy of the
        # (replicated) parameters.
        host_params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)
        file_reader = predict.Reader.from_params(
            config, host_params, step=step,
            beam_size=reading.beam_size, alpha=reading.alpha, views=reading.views,
            batch_size=64)
      split_metrics, lines[split] = file_evaluation.evaluate_with_lines(file_reader, config,
                                                                        split)
    elif reads_lines:
      split_metrics, split_sample, lines[split] = read.with_lines(params, split)
    else:
      split_metrics, split_sample = read(params, split)
    if split not in file_evaluation.SPLITS:
      sample = split_sample if split == "test" or sample is None else sample
    writer.write_scalars(step, {f"final_{split}_{k}": v for k, v in split_metrics.items()})
    figures.update({f"{split}_{k}": v for k, v in split_metrics.items()})
  # Fitted on the whole validation split where it was just read, else on the last periodic
  # validation when it read as the report does, else on a validation pass of its own (not for
  # a run that asked for no final evaluation). On several hosts each fits on its own lines;
  # process 0's are reported.
  validation = lines.get("validation", last_validation)
  if validation is None and reads_lines and config.eval_splits:
    _, _, validation = read.with_lines(params, "validation", config.num_eval_examples)
  return figures, sample, lines, validation


# The risk-coverage curve of the final readings, beside report.json.
RISK_COVERAGE_PNG = "risk_coverage.png"


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint, then evaluates.

  Writes (process 0 only): TensorBoard summaries, `config.json`, `history.jsonl`, and at the
  end `report.json`, `curves_loss.png`, `curves_accuracy.png`, `curves_epochs.png` and
  `readings.png`, and for a reader `calibration.json` (the confidence temperature fitted on
  the validation split at the last step, `calibration`) and `risk_coverage.png`;
  checkpoints go to `workdir/checkpoints`.

  Before anything is written: the whole config is checked (`config_checks.check_config`),
  and a rerun in a workdir that holds checkpoints must keep the saved config but for the
  fields of `config_lib.RESUMABLE_FIELDS` (`config_lib.check_resume`); either raises
  `config_lib.ConfigError` and leaves the workdir as it was. A damaged newest checkpoint is
  moved to `workdir/damaged_checkpoints/` and the run resumes from the newest intact one, with
  a warning (`checkpointing.Checkpoints.restore_newest`).

  Raises:
    config_lib.ConfigError: a bad config, or one the run in `workdir` cannot resume.
    OSError: the workdir cannot be written.
    checkpointing.CorruptCheckpointError: there are checkpoints but none restores.
    FloatingPointError: the training loss became non-finite (training stopped).

  Returns:
    the report: final metrics of every split in `config.eval_splits` prefixed by the split
    (`test_exact_match`, `test_cer`, `test_token_accuracy`, `test_no_eos`,
    `test_wrong_length`, `test_order_errors`, `test_exact_match_length_<n>`,
    `test_read_length_<n>`, `test_loss`, `test_images_per_second`, ... or `test_accuracy`),
    read as `config.decode` says (`decode_beam_size`, `decode_alpha`, `decode_views`; the
    evaluations during training stay greedy on one view),
    `steps`, `train_seconds` (time in training steps, compilation included, evaluation and
    checkpoint writes excluded, summed over resumed runs) and `train_images_per_second` (the
    median rate of the logged intervals of this process after its first), and `environment`
    (`environment.describe()` at the start of this process: commit, packages, CPU); for a
    reader also `temperature` and each split's `<split>_coverage_at_98`,
    `<split>_coverage_at_99`, `<split>_ece` and `<split>_ece_calibrated`
    (`calibration.selective_report`).
  """
  workdir = os.path.abspath(workdir)
  # Every check comes before anything is written, so a refused config leaves no workdir (or the
  # run in it untouched).
  config_checks.check_config(config)
  # How the final report reads (config.decode), checked now rather than after hours of training.
  reading = trained.decoding(config)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  config_lib.check_resume(workdir, config, has_checkpoints=_has_checkpoints(checkpoint_dir))
  is_chief = jax.process_index() == 0
  if is_chief:
    _write_config(workdir, config)
  logging.info("JAX process %d of %d, local devices %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  # Taken at the start: the code may be edited while the run trains.
  ran_on = environment.describe()
  logging.info("Environment: %s", json.dumps(ran_on, sort_keys=True))
  num_steps = int(config.num_train_steps)
  task = tasks.get(config)
  mesh = state_lib.create_mesh()
  model = build_model(config)
  data = input_module(config)
  learning_rate_fn = state_lib.create_learning_rate_fn(config)
  state = state_lib.create_train_state(
      config, model, state_lib.create_optimizer(config, learning_rate_fn), mesh)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  best = metrics.main_metric(config)
  # Damaged steps are moved aside (with a warning) as long as an intact one remains.
  checkpoints = checkpointing.Checkpoints(
      checkpoint_dir, keep=config.keep_checkpoints, best_metric=f"validation_{best}",
      keep_best=config.get("keep_best_checkpoints", 1), set_aside_damaged=True)

  start_step, train_seconds = 0, 0.0
  try:
    restored = checkpoints.restore_newest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  except BaseException:
    checkpoints.close()  # Else orbax's background threads fail noisily at exit.
    raise
  if restored is not None:
    state, meta, _ = restored
    start_step, train_seconds = int(meta["input_position"]), float(meta["train_seconds"])
    logging.info("Resumed from the checkpoint of step %d in %s.", start_step, workdir)
  if int(state.step) != start_step:
    raise RuntimeError(f"checkpoint step {int(state.step)} != input position {start_step}")

  # clu's writers import TensorFlow (seconds); only a full run needs them, not the step code.
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  history = reporting.History(os.path.join(workdir, "history.jsonl"), enabled=is_chief)
  history.truncate(after_step=start_step)
  stepper = steps.Stepper(config, model, learning_rate_fn, mesh)
  evaluate = Evaluator(config, model, mesh, data)
  logging.info("%s: %d parameters, %d devices, %d process(es), parallelism=%s, steps %d..%d",
               task.name, num_params, jax.device_count(), jax.process_count(),
               config.parallelism, start_step, num_steps)

  progress = tqdm.tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=not (config.progress_bar and is_chief))
  pending: list[tuple[int, dict]] = []  # Metrics of the steps since the last flush.
  # The last step's validation readings: the final report fits its temperature on them
  # rather than reading the split again (when it reads as training evaluates).
  last_validation = None
  rates: list[float] = []  # Training images/s of each flushed interval of this process.
  interval_start = time.perf_counter()

  def flush(step):
    """Brings pending step metrics to the host (one sync), checks them, writes summaries."""
    nonlocal train_seconds
    fetched = jax.device_get([m for _, m in pending])
    elapsed = time.perf_counter() - interval_start
    train_seconds += elapsed
    for (s, _), m in zip(pending, fetched):
      _check_finite(s, m, checkpoints.latest_step())
    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    summary["learning_rate"] = float(fetched[-1]["learning_rate"])
    summary["images_per_second"] = len(pending) * config.batch_size / elapsed
    rates.append(summary["images_per_second"])
    writer.write_scalars(step, {f"train_{k}": v for k, v in summary.items()})
    history.append(step, "train", summary)
    progress.set_postfix(loss=f"{summary['loss']:.4f}",
                         img_s=f"{summary['images_per_second']:.0f}", refresh=False)
    pending.clear()

  train_iter = data.train_iterator(config, seed=config.seed, start_step=start_step,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  try:
    for step in range(start_step + 1, num_steps + 1):
      state, step_metrics = stepper(state, next(train_iter))
      pending.append((step, step_metrics))
      progress.update(1)
      last = step == num_steps
      do_eval = config.eval_every_steps > 0 and (last or step % config.eval_every_steps == 0)
      do_save = last or step % config.checkpoint_every_steps == 0
      if not (do_eval or do_save or step % config.log_every_steps == 0):
        continue
      flush(step)
      if do_eval or do_save:
        state = stepper.to_canonical(state)
      checkpoint_metrics = None
      if do_eval:
        if last and task.reads_lines:
          validation, _, last_validation = evaluate.with_lines(
              state.eval_params(), "validation", config.num_eval_examples)
        else:
          validation, _ = evaluate(state.eval_params(), "validation", config.num_eval_examples)
        writer.write_scalars(step, {f"validation_{k}": v for k, v in validation.items()})
        history.append(step, "validation", validation)
        checkpoint_metrics = {f"validation_{best}": validation[best]}
      if do_save:
        checkpoints.save(step, state, {"input_position": step, "train_seconds": train_seconds},
                         checkpoint_metrics)
      interval_start = time.perf_counter()
  finally:
    progress.close()
    checkpoints.wait()

  report = {"task": task.name, "steps": num_steps, "train_seconds": train_seconds,
            "num_params": num_params, "num_devices": jax.device_count(),
            "num_processes": jax.process_count(), "global_batch_size": config.batch_size}
  if rates:
    # The steady training rate: the median interval, leaving out the first (it compiles).
    report["train_images_per_second"] = float(np.median(rates[1:] if len(rates) > 1 else rates))
  report.update({f"decode_{k}": v for k, v in reading._asdict().items()})
  report["environment"] = ran_on
  read = evaluate
  if reading.beam_size > 1 or reading.views > 1:
    read = Evaluator(config, model, mesh, data, beam_size=reading.beam_size,
                     alpha=reading.alpha, views=reading.views)
  final, sample, lines, validation = _read_splits(
      config, state.eval_params(), read, reading, writer, num_steps,
      last_validation if read is evaluate else None)
  report.update(final)
  confidence = None
  if validation is not None:
    confidence, figures = calibration.selective_report(lines, validation, step=num_steps,
                                                       decoding=reading._asdict())
    # The same record `evaluate` writes: these are the last step's (averaged) parameters.
    confidence.update(checkpoints=["latest"], ema=state_lib.check_ema_decay(config) > 0,
                      ensemble=[])
    writer.write_scalars(num_steps, {f"final_{k}": v for k, v in figures.items()})
    report.update(figures)
  writer.flush()
  checkpoints.close()
  if is_chief:
    steps_per_epoch = data.num_examples(config, "train") / config.batch_size
    reporting.write_report(workdir, report, history.load(), sample, task=task.name,
                           steps_per_epoch=steps_per_epoch)
    if confidence is not None:
      calibration.write(workdir, confidence)
      calibration.plot_risk_coverage(lines or {"validation": validation},
                                     confidence["temperature"],
                                     os.path.join(workdir, RISK_COVERAGE_PNG))
  logging.info("Report: %s", json.dumps(report, sort_keys=True))
  return report
