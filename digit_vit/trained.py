"""A finished or running training run's directory: its saved config and its checkpoints.

`predict`, `demo` and `evaluate` all start from a `--workdir` that `digit_vit.main` wrote:
`config.json` beside `checkpoints/<step>/`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import NamedTuple, Sequence

import jax
import ml_collections

from digit_vit import checkpointing, config_lib, decode, metrics, state as state_lib, tasks
from digit_vit.models import ModelConfig, build_model

Checkpoint = str | int  # 'best', 'latest' or a step number.


def load_config(workdir: str | os.PathLike, *, task: str | None = None) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir/config.json`, without the options removed
  from the code since that it holds at their neutral values (`config_lib.drop_removed`).

  Args:
    task: if given, the run must have trained this `config.task` ('read' or 'classify').
  """
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's directory "
                            "(python -m digit_vit.main --config=... --workdir=...)")
  config = ml_collections.ConfigDict(config_lib.drop_removed(json.loads(path.read_text())))
  if task is not None and tasks.get(config) is not tasks.by_name(task):
    raise ValueError(f"{workdir} trained a config.task={tasks.get(config).name!r} model; this "
                     f"needs a {task!r} model")
  return config


def parse_checkpoint(value: str) -> Checkpoint:
  """'best', 'latest' or a step number, from the command line."""
  if value in ("best", "latest"):
    return value
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{value!r}: use 'best', 'latest' or a step number") from None


def parse_member(spec: str | os.PathLike) -> tuple[str, Checkpoint]:
  """An ensemble member from the command line: 'WORKDIR' (its best checkpoint) or
  'WORKDIR@CHECKPOINT' ('best', 'latest' or a step). Returns (workdir, checkpoint)."""
  spec = str(spec)
  workdir, at, checkpoint = spec.rpartition("@")
  if not at:
    return spec, "best"
  if not workdir:
    raise ValueError(f"{spec!r}: an ensemble member is WORKDIR or WORKDIR@CHECKPOINT")
  try:
    return workdir, parse_checkpoint(checkpoint)
  except ValueError as e:
    raise ValueError(f"ensemble member {spec!r}: {e}") from None


class Decoding(NamedTuple):
  """How a trained model reads: `decode.decode`'s beam_size, alpha and views."""
  beam_size: int
  alpha: float
  views: int


def read_length(config) -> int:
  """Tokens a reading may write, `<eos>` included: `config.decode.max_length` digits + 1 (runs
  saved before that field read as far as the decoder's positions go, `model.max_length`)."""
  positions = int(config.model.max_length)
  digits = int(config.get("decode", {}).get("max_length", positions - 1))
  if not 1 <= digits <= positions - 1:
    raise ValueError(f"config.decode.max_length={digits} must be in 1..{positions - 1}: the "
                     f"decoder has model.max_length={positions} positions (<sos> and the digits)")
  return digits + 1


def read_with(config) -> str:
  """What reads a run's lines (`decode.decode`'s reader): 'decoder' (runs saved before
  `config.decode.reader` existed too), 'ctc', the CTC head's columns, or 'joint', both.

  Raises ValueError for another name and for 'ctc' or 'joint' without a CTC head (`decoding`
  rejects beam search with 'ctc')."""
  reader = str(config.get("decode", {}).get("reader", "decoder"))
  if reader not in decode.READERS:
    raise ValueError(f"config.decode.reader={reader!r} must be one of {decode.READERS}")
  if reader != "decoder" and not config.model.get("ctc_head", False):
    raise ValueError(f"config.decode.reader={reader!r} reads the CTC head: set "
                     "--config.model.ctc_head=True and --config.loss.ctc_weight > 0")
  return reader


def reader_options(config) -> dict:
  """`decode.decode`'s `reader` and `ctc_weight` for a run (`read_with`;
  `config.decode.ctc_weight`, the joint reading's weight of the CTC log-likelihood, in [0, 1];
  runs saved before it existed weigh the two alike)."""
  weight = float(config.get("decode", {}).get("ctc_weight", decode.JOINT_CTC_WEIGHT))
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"config.decode.ctc_weight={weight} must be in [0, 1] (the joint "
                     "reading's weight of the CTC log-likelihood against the decoder's)")
  return {"reader": read_with(config), "ctc_weight": weight}


def decoding(config, beam_size: int | None = None, alpha: float | None = None,
             views: int | None = None) -> Decoding:
  """How to read with a run's model: the given values, else the run's `config.decode` (runs
  saved before a field existed read greedily, alpha 0.6, one view).

  A classifier run reads each image once (beam_size 1) and may take several views too: its
  label is then the one of the mean probability over the views.

  Raises ValueError for a beam size below 1 (1 = greedy), for beam search (> 1) with a
  classifier run, which has no sequence to decode, or with a run read by its CTC head alone
  (`read_with`), and for a number of views outside
  1..len(decode.VIEW_SHIFTS).
  """
  decode_config = config.get("decode", {})
  beam_size = int(decode_config.get("beam_size", 1) if beam_size is None else beam_size)
  alpha = float(decode_config.get("alpha", 0.6) if alpha is None else alpha)
  views = int(decode_config.get("views", 1) if views is None else views)
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1 (1 = greedy decoding), got {beam_size}")
  decode.check_views(views)
  task = tasks.get(config)
  if beam_size > 1 and not task.reads_lines:
    raise ValueError(f"beam search only applies to readers; this is a "
                     f"config.task={task.name!r} run: leave beam_size at 1")
  if beam_size > 1 and task.reads_lines and read_with(config) == "ctc":
    raise ValueError(f"this run reads with its CTC head's best path (config.decode.reader="
                     f"'ctc'): beam_size={beam_size} does not apply, leave it at 1 "
                     f"(--beam_size, config.decode.beam_size)")
  return Decoding(beam_size, alpha, views)


def restore_params(workdir: str | os.PathLike, config, checkpoint: Checkpoint = "best", *,
                   ema: bool = True):
  """The parameters of a checkpoint of `workdir`.

  Args:
    checkpoint: 'best' (the step with the highest validation metric the run ranked its
      checkpoints by, `metrics.main_metric`: the metrics saved with each checkpoint, or for runs
      whose checkpoints predate that, the validation records of its history.jsonl; ties go to
      the later step; the latest when no kept step was evaluated), 'latest', or a step number.
    ema: the moving average of the parameters where the run kept one (`config.ema_decay` >
      0), as its evaluations used; False: the optimiser's last iterate.

  Returns:
    (params, step).

  Raises:
    FileNotFoundError: the run has no checkpoint yet.
    ValueError: no checkpoint of that step; `checkpointing.CorruptCheckpointError` (a
      ValueError) when the checkpoint asked for is damaged: its message names the damaged step
      and the intact ones to read instead (`--checkpoint=STEP`).
  """
  params, steps = restore_average(workdir, config, [checkpoint], ema=ema)
  return params, steps[0]


def validation_scores(workdir: str | os.PathLike, metric: str) -> dict[int, float]:
  """{step: validation `metric`} from the run's history.jsonl ({} if it has none or cannot be
  read): how 'best' ranks checkpoints saved before checkpoints held their metrics. The
  validation records are the evaluations the run ranked its checkpoints by."""
  path = pathlib.Path(workdir) / "history.jsonl"
  scores = {}
  try:
    with open(path) as f:
      for line in f:
        record = json.loads(line) if line.strip() else {}
        if record.get("split") == "validation" and metric in record:
          scores[int(record["step"])] = float(record[metric])
  except (OSError, ValueError):
    return {}
  return scores


def restore_average(workdir: str | os.PathLike, config, checkpoints: Sequence[Checkpoint], *,
                    ema: bool = True):
  """The mean of the parameters of several checkpoints of `workdir` (one: just its params).

  Averaging the last checkpoints of a run is a cheap ensemble of one model's late iterates.
  `ema`, 'best' and the errors as in `restore_params`. The checkpoint directory is opened
  read-only: reading never deletes or writes a checkpoint, even of a run still training.

  Returns:
    (params, steps): the steps the checkpoints named, in order.
  """
  if not checkpoints:
    raise ValueError("give at least one checkpoint")
  directory = pathlib.Path(workdir) / "checkpoints"
  metric = metrics.main_metric(config)
  manager = checkpointing.Checkpoints(str(directory), keep=config.keep_checkpoints,
                                      best_metric=f"validation_{metric}",
                                      keep_best=config.get("keep_best_checkpoints", 1),
                                      read_only=True)
  try:
    available = manager.all_steps()
    if not available:
      raise FileNotFoundError(f"no checkpoint in {directory}: train first, or wait for the "
                              "first checkpoint")
    steps = []
    for checkpoint in checkpoints:
      if checkpoint == "best":
        steps.append(manager.best_step(validation_scores(workdir, metric)))
      elif checkpoint == "latest":
        steps.append(manager.latest_step())
      else:
        step = int(checkpoint)
        if step not in available:
          raise ValueError(f"no checkpoint of step {step} in {directory}; there are "
                           f"{sorted(available)}")
        steps.append(step)
    if len(set(steps)) < len(steps):
      raise ValueError(f"checkpoints {list(checkpoints)} name step(s) {steps} more than once")
    # The parameters alone (no optimiser state), replicated over every device as training
    # evaluated them. The moving average is what `TrainState.eval_params` reads with: a run
    # keeps it exactly when its config.ema_decay > 0.
    replicated = jax.sharding.NamedSharding(state_lib.create_mesh(), jax.sharding.PartitionSpec())
    field = "ema_params" if ema and state_lib.check_ema_decay(config) > 0 else "params"
    abstract = {field: state_lib.abstract_params(config, build_model(config), replicated)}
    total = None
    for step, checkpoint in zip(steps, checkpoints):
      try:
        params = manager.restore_fields(abstract, step)[field]
      except checkpointing.CorruptCheckpointError as error:
        raise _damaged(manager, abstract, error, checkpoint, step) from None
      total = params if total is None else jax.tree.map(lambda a, b: a + b, total, params)
  finally:
    manager.close()
  params = jax.tree.map(lambda p: p / len(steps), total) if len(steps) > 1 else total
  return params, steps


def _damaged(manager, abstract, error, checkpoint, step) -> checkpointing.CorruptCheckpointError:
  """The error for a damaged checkpoint asked for: which steps still restore, and how to read
  one of them."""
  others = [s for s in manager.all_steps() if s not in error.damaged]
  intact, also_damaged = manager.check_steps(abstract, others)
  damaged = {**error.damaged, **also_damaged}
  asked = f"--checkpoint={checkpoint}" + (f" (step {step})" if checkpoint in ("best", "latest")
                                          else "")
  if intact:
    way = ("read an intact one instead: "
           + " or ".join(f"--checkpoint={s}" for s in sorted(intact, reverse=True)))
  else:
    way = "nothing in this run can be read: train it again"
  return checkpointing.CorruptCheckpointError(
      f"{asked} cannot be read: "
      f"{checkpointing.describe_damage(manager.directory, damaged, intact)}; {way}",
      damaged, intact)


# What members of a classifier ensemble must share: the same images (canvas and normalisation)
# into the same classes. Readers share decode.check_ensemble's fields.
_CLASSIFIER_SHARED_MODEL_FIELDS = ("image_height", "image_width", "image_channels", "num_classes")
_CLASSIFIER_SHARED_DATA_FIELDS = ("name", "source", "mean", "std")


def check_classifier_ensemble(configs: Sequence[ml_collections.ConfigDict]):
  """Raises unless classifier runs with these configs can classify the same images together.

  Members may differ in anything else (width, depth, patches, stem, training).
  """
  first = configs[0]
  for i, member in enumerate(configs[1:], start=1):
    for section, fields in (("model", _CLASSIFIER_SHARED_MODEL_FIELDS),
                            ("data", _CLASSIFIER_SHARED_DATA_FIELDS)):
      for field in fields:
        theirs, ours = member[section].get(field), first[section].get(field)
        if theirs != ours:
          shared = [f"data.{f}" for f in _CLASSIFIER_SHARED_DATA_FIELDS] + [
              f"model.{f}" for f in _CLASSIFIER_SHARED_MODEL_FIELDS]
          raise ValueError(
              f"ensemble member {i} has {section}.{field}={theirs!r} but member 0 has {ours!r}: "
              f"classifiers read together must share {', '.join(shared)} (the same images "
              "into the same classes)")


def restore_ensemble(config, members: Sequence[str | os.PathLike], *, ema: bool = True):
  """Further models that read together with a run whose config is `config`.

  Every member is checked before any checkpoint is restored: a run of the same `config.task`,
  whose model reads the same images into the same tokens (readers, `decode.check_ensemble`) or
  the same classes (classifiers, `check_classifier_ensemble`).

  Args:
    members: 'WORKDIR' (its best checkpoint) or 'WORKDIR@CHECKPOINT' each (`parse_member`).
    ema: as in `restore_params`.

  Returns:
    (models, described): [(ModelConfig, params)] for `decode` or `steps.eval_step`, and
    [{'workdir', 'checkpoint', 'step'}] to report what was read.
  """
  specs = [parse_member(member) for member in members]
  task = tasks.get(config)
  member_configs = [load_config(workdir, task=task.name) for workdir, _ in specs]
  if specs:
    if task.reads_lines:
      decode.check_ensemble([ModelConfig.from_config(c.model)
                             for c in [config, *member_configs]])
    else:
      check_classifier_ensemble([config, *member_configs])
  models, described = [], []
  for (workdir, checkpoint), member_config in zip(specs, member_configs):
    params, step = restore_params(workdir, member_config, checkpoint, ema=ema)
    models.append((ModelConfig.from_config(member_config.model), params))
    described.append({"workdir": workdir, "checkpoint": str(checkpoint), "step": step})
  return models, described
