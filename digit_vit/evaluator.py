"""The `Evaluator`: a parameter set's metrics on a split, decoded as asked.

As big_vision keeps its evaluators apart from the loop, this module holds evaluation alone:
`train.train_and_evaluate` evaluates with it during and after training, `evaluate` on a
finished run's checkpoints. It feeds the input module's evaluation batches (every example of
the split once, padding rows masked out) through the compiled `steps.eval_step` and adds the
metric sums of every batch before dividing (`metrics.summarize`), so the figures do not depend
on the batch size, the devices or the processes.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from digit_vit import calibration, metrics, steps, tasks, xla_options
from digit_vit.models import tokens


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded on axis 0, in order (its part of the batch)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


class Evaluator:
  """Evaluates parameters on a split with a compiled `steps.eval_step` decoding as asked.

  The parameters are replicated over `mesh` (as `state.create_train_state` makes them) and
  each batch is sharded over its 'data' axis, so every process feeds its own rows.
  """

  def __init__(self, config, model, mesh, input_module, *, beam_size: int = 1,
               alpha: float = 0.6, views: int = 1, ensemble=()):
    """
    Args:
      input_module: the task's data module (`digit_vit.data.tasks.input_module`): its
        `eval_iterator` gives the batches.
      beam_size, alpha, views: how to decode (`steps.eval_step`).
      ensemble: further models [(ModelConfig, params)] of the same task that read together
        with the params evaluated (`steps.eval_step`).
    """
    self.config = config
    self.input_module = input_module
    self.data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    self.ensemble = tuple(ensemble)  # [(ModelConfig, params)], as given.
    self._ensemble_params = tuple(params for _, params in ensemble)
    step = functools.partial(steps.eval_step, config=config, model=model, beam_size=beam_size,
                             alpha=alpha, views=views,
                             ensemble_configs=tuple(c for c, _ in ensemble))
    self._step = xla_options.jit(step, matmul_dtype=xla_options.matmul_dtype_of(config),
                                 in_shardings=(replicated, self.data_sharding, replicated),
                                 out_shardings=(replicated, self.data_sharding,
                                                self.data_sharding))

  def _run(self, params, split: str, num_examples: int, extras: bool = False):
    """Yields (host-local batch, metric sums, host-local predictions, host-local extras of
    `eval_step` or None) batch by batch."""
    # The split's first `num_examples` lines (all for <= 0), every one once, bucket by bucket.
    batches = self.input_module.eval_iterator(self.config, split,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count(),
                                              num_examples=num_examples)
    for batch in batches:
      global_batch = jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self.data_sharding, x), batch)
      sums, predictions, more = self._step(params, global_batch, self._ensemble_params)
      yield (batch, sums, local_rows(predictions),
             jax.tree.map(local_rows, more) if extras else None)

  def __call__(self, params, split: str, num_examples: int = -1):
    """Metrics of `params` on the first `num_examples` of `split` (-1: all of it).

    Returns:
      (metrics dict as `metrics.summarize`, sample): sample holds this process's first batch:
      `image`, `tokens`/`label`, `mask` and `prediction` (numpy), for pictures.
    """
    summary, sample, _ = self._evaluate(params, split, num_examples, lines=False)
    return summary, sample

  def with_lines(self, params, split: str, num_examples: int = -1):
    """`__call__` of a reader, and each line's reading for calibration: (metrics, sample,
    `calibration.Lines` of this process's lines, padding rows dropped), from the one pass."""
    if not tasks.get(self.config).reads_lines:
      raise ValueError("calibration lines exist for readers (task 'read') only")
    return self._evaluate(params, split, num_examples, lines=True)

  def _evaluate(self, params, split: str, num_examples: int, lines: bool):
    """(metrics, sample, `calibration.Lines` or None): one pass over the split, adding each
    batch's sums on the host; with `lines`, also each valid line's reading."""
    total, sample, kept = None, None, []
    timed_images, timed_start = 0, None
    for batch, sums, predictions, more in self._run(params, split, num_examples, lines):
      total = metrics.add_sums(total, jax.device_get(sums))  # Waits for the batch.
      if lines:
        valid = batch["mask"].astype(bool)
        outputs = predictions[valid]
        _, targets = tokens.split_decoder_io(batch["tokens"][valid])
        kept.append(calibration.Lines(more["step_log_probs"][valid], outputs,
                                      metrics.exact_matches(outputs, targets)))
      if sample is None:
        sample = {**batch, "prediction": predictions}
        timed_start = time.perf_counter()  # The first batch may compile: time the others.
      else:
        timed_images += self.config.eval_batch_size
    if total is None:
      raise ValueError(f"split {split!r} has no examples")
    summary = metrics.summarize(total)
    if timed_images:
      # Evaluation throughput (greedy decoding for 'read'), padding rows included.
      summary["images_per_second"] = timed_images / (time.perf_counter() - timed_start)
    return summary, sample, calibration.Lines.concatenate(kept) if lines else None

  def predictions(self, params, split: str, num_examples: int = -1) -> np.ndarray:
    """This process's predictions of `split` in the split's order, padding rows dropped: the
    raw outputs int32 [n, max_digits + 1] (read) or labels int32 [n] (classify)."""
    rows, order = [], []
    for batch, _, predictions, _ in self._run(params, split, num_examples):
      rows.append(predictions[batch["mask"]])
      if "index" in batch:  # Lines come bucket by bucket: put them back in the split's order.
        order.append(batch["index"][batch["mask"]])
    if not rows:
      raise ValueError(f"split {split!r} has no examples")
    out = np.concatenate(rows)
    return out[np.argsort(np.concatenate(order), kind="stable")] if order else out
