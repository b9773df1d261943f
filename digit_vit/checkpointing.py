"""Orbax checkpoints of the training state, kept in `workdir/checkpoints`.

Each checkpoint is a step directory with up to three items:
  - 'state': the TrainState pytree (step, params, opt_state, rng and, with a moving average,
    ema_params) as global arrays; a training run restores it whole (`restore`), a reader
    only the parameters it reads with (`restore_fields`),
  - 'meta': JSON with what the host needs to resume: the input position (the number of
    batches consumed, passed back to the input pipeline as `start_step`) and the training
    seconds spent so far,
  - 'metrics': JSON of the validation metrics the step was saved with, if any (orbax's own
    metrics item, written because the manager has a `best_fn`), so that a new process (predict,
    evaluate, the demo, a resumed run) still knows which step was best.

The manager keeps the latest `keep` checkpoints and, in addition, the `keep_best` best ones by
a validation metric (checkpoints saved with no metrics only count as "latest"). Saves are
asynchronous: the arrays are copied off the devices, then written in the background while
training goes on; a step directory appears under its final name only once complete, so a
process killed mid-write leaves the previous checkpoint as the latest. On several hosts every
process calls `save`/`restore` and orbax coordinates the writes.

Damaged checkpoints (a disk filled up, a file truncated or deleted by hand) raise
`CorruptCheckpointError`, a ValueError naming the damaged step and the intact ones, never an
orbax-internal error. A training run that resumes (`restore_newest`) falls back to the newest
intact step with a warning and moves the damaged, newer ones out of the way, into
`damaged_checkpoints/` beside the checkpoint directory (kept for a look, not deleted), so the
run can save those steps again. Readers open the directory read-only (`read_only=True`) and
are told which `--checkpoint=STEP` still works.
"""

from __future__ import annotations

import gc
import json
import logging as std_logging
import os
import shutil
import sys
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

# Where `restore_newest` moves damaged steps: beside the checkpoint directory.
DAMAGED_DIR = "damaged_checkpoints"


class CorruptCheckpointError(ValueError):
  """A checkpoint that cannot be read.

  Attributes:
    damaged: {step: what is wrong with it}.
    intact: the steps known to restore (empty when none does, or none was tried).
  """

  def __init__(self, message: str, damaged: dict[int, str], intact: Sequence[int] = ()):
    super().__init__(message)
    self.damaged = dict(damaged)
    self.intact = sorted(intact)


def describe_damage(directory: str, damaged: dict[int, str], intact: Sequence[int]) -> str:
  """One line: which steps of `directory` are damaged and why, and which are intact."""
  what = "; ".join(f"step {step}: {problem}" for step, problem in sorted(damaged.items()))
  noun = "checkpoint" if len(damaged) == 1 else "checkpoints"
  intact_text = (f"intact: step(s) {', '.join(map(str, sorted(intact)))}" if intact
                 else "no intact checkpoint remains")
  return f"damaged {noun} in {directory} ({what}); {intact_text}"


def _summary(error: BaseException) -> str:
  """A short, one-line account of an orbax / TensorStore error (theirs run to pages)."""
  text = " ".join(str(error).split())
  text = text.split(" See full TensorStore details")[0].split(" [tensorstore_spec=")[0]
  if len(text) > 200:
    text = text[:197] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_abandoned_read(unraisable) -> bool:
  """Whether an unraisable exception is the echo of an array read orbax abandoned: its
  coroutine, or a TensorStore read that finished after orbax closed the event loop."""
  if any(name in repr(unraisable.object) for name in ("_read_array", "async_deserialize")):
    return True
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


class _AbandonedTasks(std_logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' of orbax's abandoned reads."""

  def filter(self, record):
    message = record.getMessage()
    return not ("never retrieved" in message and "orbax" in message)


_quieted = False


def _quiet_abandoned_reads() -> None:
  """Silences the echoes of a failed restore, once it has been reported in one line.

  When one array of a step fails to read, orbax closes its event loop and abandons the reads
  of the other arrays. Python would then print each of them as it finishes or is collected
  ('Exception ignored in: <coroutine _read_array_index_and_device_put>', 'RuntimeError: Event
  loop is closed', 'Task exception was never retrieved', with a page of TensorStore spec each),
  hundreds of lines after the message that matters. From the first failed restore on, the
  process drops those reports (and only those); other unraisable exceptions still print.
  """
  global _quieted
  if not _quieted:
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _is_abandoned_read(unraisable):
        previous(unraisable)

    sys.unraisablehook = hook
    std_logging.getLogger("asyncio").addFilter(_AbandonedTasks())
    _quieted = True
  gc.collect()  # The abandoned coroutines go now, quietly.


def _sync(name: str) -> None:
  """A barrier of all processes (nothing on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _partial_restore(path: str, item):
  """An orbax partial restore of the pytree saved at `path` (a step's 'state' directory): the
  subtrees of `item` (a pytree or dict of `jax.ShapeDtypeStruct` with their shardings) alone,
  leaving the arrays of the others unread."""
  args = ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(path, args=args)


class Checkpoints:
  """Saves and restores (state, meta) in `directory`.

  Args:
    directory: where the step directories go (created if missing, unless read-only).
    keep: how many of the latest checkpoints to keep.
    best_metric: the key of the `metrics` passed to `save` to rank by (higher is better);
      None keeps only the latest.
    keep_best: how many of the best checkpoints by `best_metric` to keep besides the latest
      (0: none beyond the latest `keep`).
    read_only: for readers (predict, evaluate, the demo): nothing is created, saved or
      deleted, and a damaged step's files are not read until that step is asked for.
    set_aside_damaged: for a training run about to resume: steps whose metadata files are
      missing or unreadable (which orbax would fail on when it opens the directory) are moved
      to `damaged_checkpoints/` with a warning, as long as some step is intact.
  """

  def __init__(self, directory: str, *, keep: int, best_metric: str | None = None,
               keep_best: int = 1, read_only: bool = False, set_aside_damaged: bool = False):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    if keep_best < 0:
      raise ValueError(f"keep_best_checkpoints must be >= 0, got {keep_best}")
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self.read_only = read_only
    policies = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric is not None:
      # Orbax writes the metrics of a save as a JSON item of its step only when the options
      # have a best_fn, and reads them back when a manager opens the directory; without it
      # the best step was known to the process that saved it only.
      best_fn = lambda metrics: float(metrics.get(best_metric, float("-inf")))  # noqa: E731
      if keep_best:
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=best_fn, n=keep_best, keep_checkpoints_without_metrics=False))
    if set_aside_damaged and not read_only:
      damaged = {step: problem for step in self._step_dirs()
                 if (problem := self.check_files(step))}
      if damaged and len(damaged) < len(self._step_dirs()):
        self.set_aside(damaged)
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only,
        save_interval_steps=0 if read_only else 1,
        best_fn=best_fn, best_mode="max",
        # Readers do not read every step's metadata up front: a damaged step then fails only
        # when it is asked for, and the others stay readable.
        lightweight_initialize=read_only,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
    try:
      self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                           options=options)
    except Exception as error:  # pylint: disable=broad-except
      steps = self._step_dirs()
      damaged = {step: problem for step in steps if (problem := self.check_files(step))}
      if not damaged:
        raise
      raise CorruptCheckpointError(
          describe_damage(self.directory, damaged, [s for s in steps if s not in damaged])
          + "; move the damaged steps out of the directory, or use a new --workdir",
          damaged) from error

  # ---- Steps

  def _step_dirs(self) -> list[int]:
    """The steps with a directory here (committed or not), from the file system."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def metrics(self, step: int) -> dict[str, float] | None:
    """The metrics `step` was saved with (from disk, so from any process); None if none were,
    or their file cannot be read."""
    try:
      metrics = self.manager.metrics(step)
    except Exception:  # pylint: disable=broad-except
      return None  # A damaged metrics file ranks the step as one saved without metrics.
    return dict(metrics) if metrics else None

  def best_step(self, scores: dict[int, float] | None = None) -> int | None:
    """The step with the highest `best_metric`; ties go to the later step.

    Args:
      scores: the metric of steps saved without metrics (runs from before checkpoints held
        them), e.g. from the run's history.jsonl.

    Returns:
      the best step among the checkpoints with a metric; the latest when none has one (or no
      best_metric was given); None when there is no checkpoint.
    """
    scored = []
    for step in self.all_steps():
      metrics = self.metrics(step) if self.best_metric else None
      if metrics and self.best_metric in metrics:
        scored.append((float(metrics[self.best_metric]), step))
      elif scores and step in scores and self.best_metric:
        scored.append((float(scores[step]), step))
    return max(scored)[1] if scored else self.latest_step()

  # ---- Saving

  def save(self, step: int, state, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> bool:
    """Starts saving `state` (global jax arrays), `meta` (JSON) and `metrics` (JSON, which
    rank the step for `keep_best` and `best_step`) at `step`; returns False when that step is
    already saved (a finished run that is run again)."""
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  # ---- Restoring

  def check_files(self, step: int) -> str | None:
    """What is wrong with `step`'s metadata files (missing, or not valid JSON), else None.

    Cheap: reads a few small files, not the arrays; truncated array data is found by
    `restore` only."""
    root = os.path.join(self.directory, str(step))
    if not os.path.isfile(os.path.join(root, "state", "_METADATA")):
      return "state/_METADATA is missing"
    for name in ("state/_METADATA", "meta/metadata", "metrics/metrics", "_CHECKPOINT_METADATA"):
      path = os.path.join(root, *name.split("/"))
      if name.startswith(("metrics", "_CHECKPOINT")) and not os.path.exists(path):
        continue  # Optional: a step saved without metrics; orbax's own bookkeeping.
      try:
        with open(path) as f:
          json.load(f)
      except (OSError, ValueError) as error:
        return f"{name} cannot be read ({_summary(error)})"
    return None

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, meta) at `step` (default: the latest).

    Args:
      abstract_state: a pytree like the state with `jax.ShapeDtypeStruct` leaves carrying the
        shardings to restore onto (e.g. from a freshly initialised state).

    Raises:
      CorruptCheckpointError: the step's files are missing or damaged (its `intact` is empty:
        the other steps were not tried; `restore_newest` and `check_steps` try them).
    """
    step = self.latest_step() if step is None else step
    return self._read(step, lambda: self._restore(abstract_state, step))

  def restore_fields(self, abstract_fields: dict[str, Any], step: int | None = None):
    """Restores some fields of the state saved at `step` (default: the latest) and reads none
    of the others' arrays (an orbax partial restore): what a reader needs, e.g. the parameters
    without the optimiser state, and without building a whole state to restore into.

    Args:
      abstract_fields: {field of the saved state ('params', 'ema_params', ...): a pytree of
        `jax.ShapeDtypeStruct` with the shardings to restore onto}.

    Returns:
      {field: its restored pytree}.

    Raises:
      CorruptCheckpointError: as `restore`.
    """
    step = self.latest_step() if step is None else step
    path = os.path.join(self.directory, str(step), "state")
    return self._read(step, lambda: _partial_restore(path, abstract_fields))

  def _read(self, step: int, restore_fn):
    """`restore_fn()`, which reads `step`, with a damaged step's errors (a missing or broken
    file, TensorStore's reports of truncated arrays) turned into one CorruptCheckpointError."""
    problem = self.check_files(step)
    if problem:
      raise CorruptCheckpointError(describe_damage(self.directory, {step: problem}, []),
                                   {step: problem})
    try:
      return restore_fn()
    except Exception as error:  # pylint: disable=broad-except
      # TensorStore reports truncated or missing array files as plain Exceptions, and orbax a
      # state whose structure differs from the step's (written before a field of the state
      # existed) as a ValueError: either way the step cannot be read.
      problem = _summary(error)
    logging.debug("Checkpoint step %d in %s does not restore: %s", step, self.directory,
                  problem)
    _quiet_abandoned_reads()
    raise CorruptCheckpointError(describe_damage(self.directory, {step: problem}, []),
                                 {step: problem})

  def _restore(self, abstract_state, step: int):
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def check_steps(self, abstract_fields: dict[str, Any],
                  steps: Sequence[int] | None = None) -> tuple[list[int], dict[int, str]]:
    """Tries to restore `abstract_fields` (as `restore_fields` takes them) of each of `steps`
    (default: all), for error messages: which steps a reader can still read.

    Returns:
      (intact steps, {damaged step: what is wrong}).
    """
    intact, damaged = [], {}
    for step in self.all_steps() if steps is None else steps:
      try:
        self.restore_fields(abstract_fields, step)
      except CorruptCheckpointError as error:
        damaged.update(error.damaged)
        continue
      intact.append(step)
    return intact, damaged

  def restore_newest(self, abstract_state):
    """Restores the newest intact checkpoint, to resume a run.

    Damaged steps newer than it are moved to `damaged_checkpoints/` with a warning (on
    process 0), so that the resumed run can save those steps again.

    Returns:
      (state, meta, step), or None when there is no checkpoint.

    Raises:
      CorruptCheckpointError: there are checkpoints, but none restores. Nothing is moved then
        (when none restores, the cause may be the code rather than the files).
    """
    damaged = {}
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(abstract_state, step)
      except CorruptCheckpointError as error:
        damaged.update(error.damaged)
        continue
      if damaged:
        self.set_aside(damaged)
        self.manager.reload()
        logging.warning("Resuming from step %d, the newest intact checkpoint.", step)
      return state, meta, step
    if damaged:
      raise CorruptCheckpointError(
          describe_damage(self.directory, damaged, []) + "; the run cannot resume (when every "
          "step fails alike, the code may have changed the state since they were written): "
          "start it again in a new --workdir; the checkpoints were left where they are",
          damaged)
    return None

  def set_aside(self, damaged: dict[int, str]) -> None:
    """Moves each damaged step to `damaged_checkpoints/<step>` beside the checkpoint directory
    and warns (process 0 moves; on several hosts all first wait until every one has looked at
    the steps, then until the moves are done)."""
    _sync("digit_vit: checkpoints checked")
    if jax.process_index() == 0:
      for step, problem in sorted(damaged.items()):
        aside = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        place, copies = os.path.join(aside, str(step)), 0
        while os.path.exists(place):  # The same step damaged before: keep both.
          copies += 1
          place = os.path.join(aside, f"{step}.{copies}")
        os.makedirs(aside, exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), place)
        logging.warning("Checkpoint step %d in %s is damaged (%s): moved to %s.", step,
                        self.directory, problem, place)
    _sync("digit_vit: damaged checkpoints moved")

  # ---- Shutting down

  def wait(self):
    """Blocks until the background writes are done."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
