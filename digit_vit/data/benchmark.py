"""Input-pipeline throughput: how many training images per second the pipeline delivers.

`pipeline_images_per_second(config)` builds the dataset if needed (not timed), starts the train
iterator, takes a few warm-up batches, then times `num_batches` batches. `digit_vit.bench
--only=pipeline` prints it beside the training step's rate.
"""

from __future__ import annotations

import time

from digit_vit import tasks
from digit_vit.data.tasks import input_module


def pipeline_images_per_second(config, num_batches: int = 50, *, warmup_batches: int = 3,
                               seed: int = 0) -> float:
  """Host-local train images per second delivered by the `train_iterator` of the config's
  task's input module (`data.tasks.input_module`).

  Args:
    config: the experiment config; `config.batch_size` is the batch (single process).
    num_batches: batches timed after the warm-up.
    warmup_batches: batches taken before timing (first-batch latency, prefetch fill).
    seed: the iterator seed.
  """
  data = input_module(config)  # Imports TensorFlow.
  if tasks.get(config).reads_lines:
    data.get_dataset_builder(config)  # Builds the lines (untimed) where they are not yet built.
  it = data.train_iterator(config, seed=seed, process_index=0, process_count=1)
  for _ in range(warmup_batches):
    next(it)
  images = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    images += next(it)["image"].shape[0]
  return images / (time.perf_counter() - start)
