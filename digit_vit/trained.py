"""A finished or running training run's directory: its saved config and its checkpoints.

`predict`, `demo` and `evaluate` all start from a `--workdir` that `digit_vit.main` wrote:
`config.json` beside `checkpoints/<step>/`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import jax
import ml_collections

from digit_vit import checkpointing
from digit_vit.models import build_model

Checkpoint = str | int  # 'best', 'latest' or a step number.


def load_config(workdir: str | os.PathLike, *, task: str | None = None) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir/config.json`.

  Args:
    task: if given, the run must have trained this `config.task` ('read' or 'classify').
  """
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's directory "
                            "(python -m digit_vit.main --config=... --workdir=...)")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if task is not None and config.task != task:
    raise ValueError(f"{workdir} trained a config.task={config.task!r} model; this needs a "
                     f"{task!r} model")
  return config


def parse_checkpoint(value: str) -> Checkpoint:
  """'best', 'latest' or a step number, from the command line."""
  if value in ("best", "latest"):
    return value
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{value!r}: use 'best', 'latest' or a step number") from None


def decoding(config, beam_size: int | None = None,
             alpha: float | None = None) -> tuple[int, float]:
  """(beam_size, alpha) for reading with a run's model: the given values, else the run's
  `config.decode` (runs saved before it existed read greedily, alpha 0.6).

  Raises ValueError for a beam size below 1 (1 = greedy), and for beam search (> 1) with a
  classifier run, which has no sequence to search.
  """
  decode_config = config.get("decode", {})
  beam_size = int(decode_config.get("beam_size", 1) if beam_size is None else beam_size)
  alpha = float(decode_config.get("alpha", 0.6) if alpha is None else alpha)
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1 (1 = greedy decoding), got {beam_size}")
  if beam_size > 1 and config.get("task", "read") != "read":
    raise ValueError(f"beam search only applies to readers; this is a "
                     f"config.task={config.task!r} run: leave beam_size at 1")
  return beam_size, alpha


def restore_params(workdir: str | os.PathLike, config, checkpoint: Checkpoint = "best"):
  """The parameters of a checkpoint of `workdir`.

  Args:
    checkpoint: 'best' (by the validation metric the run kept its best checkpoint by),
      'latest', or a step number.

  Returns:
    (params, step).
  """
  params, steps = restore_average(workdir, config, [checkpoint])
  return params, steps[0]


def restore_average(workdir: str | os.PathLike, config, checkpoints: Sequence[Checkpoint]):
  """The mean of the parameters of several checkpoints of `workdir` (one: just its params).

  Averaging the last checkpoints of a run is a cheap ensemble of one model's late iterates.

  Returns:
    (params, steps): the steps the checkpoints named, in order.
  """
  # Imported here: only restoring needs the optimiser's state structure from train.
  from digit_vit import train  # pylint: disable=import-outside-toplevel
  if not checkpoints:
    raise ValueError("give at least one checkpoint")
  directory = pathlib.Path(workdir) / "checkpoints"
  manager = checkpointing.Checkpoints(str(directory), keep=config.keep_checkpoints,
                                      best_metric=f"validation_{train.main_metric(config)}")
  try:
    available = manager.manager.all_steps()
    if not available:
      raise FileNotFoundError(f"no checkpoint in {directory}: train first, or wait for the "
                              "first checkpoint")
    steps = []
    for checkpoint in checkpoints:
      if checkpoint == "best":
        steps.append(manager.best_step())
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
    mesh = train.create_mesh()
    model = build_model(config)
    tx = train.create_optimizer(config, train.create_learning_rate_fn(config))
    abstract = jax.eval_shape(lambda: train.create_train_state(config, model, tx, mesh))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
    total = None
    for step in steps:
      params = manager.restore(abstract, step)[0].params
      total = params if total is None else jax.tree.map(lambda a, b: a + b, total, params)
  finally:
    manager.close()
  params = jax.tree.map(lambda p: p / len(steps), total) if len(steps) > 1 else total
  return params, steps
