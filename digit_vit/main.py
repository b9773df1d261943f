r"""Trains and evaluates from a config file.

  python -m digit_vit.main --config=configs/default.py --workdir=runs/default \
      [--config.learning_rate=3e-4 ...] [--jax_distributed]

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from digit_vit import logs, train

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command's flags when it runs, not on import: absl flags are global, and
  `bench` defines --config, `predict` and `evaluate` --workdir."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and the report.")
  flags.DEFINE_bool("jax_distributed", False,
                    "Call jax.distributed.initialize() first (multi-host runs; the cluster "
                    "environment, e.g. SLURM or TPU pods, supplies the coordinator).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logs.quiet_libraries()
  # TensorFlow only feeds data (tf.data); keep it off the GPUs that JAX uses.
  tf.config.set_visible_devices([], "GPU")
  if FLAGS.jax_distributed:
    jax.distributed.initialize()
  logging.info("JAX process %d of %d, local devices %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
