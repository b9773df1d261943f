"""Orbax checkpoints of the training state, kept in `workdir/checkpoints`.

Each checkpoint is a step directory with two items:
  - 'state': the TrainState pytree (step, params, optimiser state, RNG key) as global arrays,
  - 'meta': JSON with what the host needs to resume: the input position (the number of
    batches consumed, passed back to the input pipeline as `start_step`) and the training
    seconds spent so far.

The manager keeps the latest `keep` checkpoints and, in addition, the best one by a validation
metric (checkpoints saved with no metrics only count as "latest"). Saves are asynchronous:
the arrays are copied off the devices, then written in the background while training goes on;
a step directory appears under its final name only once complete, so a process killed
mid-write leaves the previous checkpoint as the latest. On several hosts every process calls
`save`/`restore` and orbax coordinates the writes.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpoints:
  """Saves and restores (state, meta) in `directory`.

  Args:
    directory: where the step directories go (created if missing).
    keep: how many of the latest checkpoints to keep.
    best_metric: the key of the `metrics` passed to `save` to rank by (higher is better);
      None keeps only the latest.
  """

  def __init__(self, directory: str, *, keep: int, best_metric: str | None = None):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric is not None:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=True,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
    self.best_metric = best_metric
    self.manager = ocp.CheckpointManager(os.path.abspath(directory),
                                         item_names=("state", "meta"), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest `best_metric` among the checkpoints saved with metrics; the
    latest when none was (or no best_metric was given); None when there is no checkpoint."""
    scored = []
    for step in self.manager.all_steps():
      metrics = self.manager.metrics(step) if self.best_metric else None
      if metrics and self.best_metric in metrics:
        scored.append((float(metrics[self.best_metric]), step))
    return max(scored)[1] if scored else self.latest_step()

  def save(self, step: int, state, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> bool:
    """Starts saving `state` (global jax arrays) and `meta` (JSON) at `step`; returns False
    when that step is already saved (a finished run that is run again)."""
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, meta) at `step` (default: the latest).

    Args:
      abstract_state: a pytree like the state with `jax.ShapeDtypeStruct` leaves carrying the
        shardings to restore onto (e.g. from a freshly initialised state).
    """
    step = self.latest_step() if step is None else step
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except ValueError as error:
      # Only the optional field a state may leave at None; any other mismatch stays an error.
      if ("tree structures do not match" not in str(error)
          or getattr(abstract_state, "ema_params", False) is not None):
        raise
      # Written before the state gained an optional field (`ema_params`, None when unused):
      # restore what the checkpoint has; the fields it lacks keep their None. A checkpointer
      # of its own, as the manager has bound the item to the standard handler.
      state_args = ocp.args.PyTreeRestore(
          abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
          partial_restore=True)
      state = ocp.PyTreeCheckpointer().restore(
          os.path.join(str(self.manager.directory), str(step), "state"), args=state_args)
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return state, meta.meta
    return restored.state, restored.meta

  def wait(self):
    """Blocks until the background writes are done."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
