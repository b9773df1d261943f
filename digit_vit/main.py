r"""Trains and evaluates from a config file.

  python -m digit_vit.main --config=configs/default.py --workdir=runs/default \
      [--config.learning_rate=3e-4 ...] [--jax_distributed [--coordinator_address=HOST:PORT
      --num_processes=N --process_id=I]]

Re-running the same command resumes from the latest checkpoint in --workdir. A rerun may change
only `num_train_steps` (to extend the run) and the settings of evaluation, logging,
checkpointing and reading (`config_lib.RESUMABLE_FIELDS`); any other change is refused, naming
the fields, and the run is left untouched: use a new --workdir for a new config. A damaged
newest checkpoint is moved to --workdir/damaged_checkpoints/ and the run resumes from the
newest intact one, with a warning.

Errors. The whole config is checked before anything is created. A user error prints one line,
`error: ...`, on stderr, with no traceback, and exits with status
  2: usage: a bad flag, config file, override or config value, or a config that the run in
     --workdir cannot resume (nothing was created or changed);
  1: failure: the training loss became non-finite, the workdir cannot be written, no
     checkpoint of the run restores, or the digit source is unavailable.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from digit_vit import checkpointing, config_lib, logs, train
from digit_vit.cli import FAILURE, USAGE, error, parse_flags  # One style for every command.
from digit_vit.data import sources

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None):
  """Defines the command's flags when it runs, not on import: absl flags are global, and
  `bench` defines --config, `predict` and `evaluate` --workdir.

  Args:
    flag_values: where to define them (tests pass a fresh FlagValues).
    argv: the command line whose `--config.x=...` overrides the config flag takes (default
      sys.argv).
  """
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  flag_values=flag_values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and the report.",
                      flag_values=flag_values)
  flags.DEFINE_bool("jax_distributed", False,
                    "Call jax.distributed.initialize() first (multi-host runs). A cluster "
                    "environment (SLURM, Open MPI, Kubernetes, TPU pods) supplies the "
                    "coordinator; elsewhere, e.g. several processes on one machine, give "
                    "--coordinator_address, --num_processes and --process_id.",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None,
                      "With --jax_distributed: HOST:PORT of the coordinator that process 0 "
                      "starts, the same on every process (default: the cluster environment's, "
                      "or $JAX_COORDINATOR_ADDRESS).", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None,
                       "With --jax_distributed: how many processes run the command (default: "
                       "the cluster environment's).", lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("process_id", None,
                       "With --jax_distributed: this process's index, 0 .. num_processes - 1; "
                       "process 0 writes the logs and the report (default: the cluster "
                       "environment's).", lower_bound=0, flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
  """`train.train_and_evaluate(config, workdir)` with its user errors turned into one line.

  Returns:
    the exit status: 0 trained; 2 a config error (`config_lib.ConfigError`: bad values, or a
    config the run in `workdir` cannot resume; nothing was created or changed); 1 a failure
    (non-finite loss, an unwritable workdir, no checkpoint that restores, an unavailable digit
    source).
  """
  try:
    train.train_and_evaluate(config, workdir)
  except checkpointing.CorruptCheckpointError as e:  # A ValueError too: comes first.
    return error(str(e), FAILURE)
  except config_lib.ConfigError as e:
    return error(str(e), USAGE)
  except (FloatingPointError, OSError, sources.SourceUnavailableError) as e:
    return error(str(e), FAILURE)
  return 0


def _start_tensorflow_quietly() -> None:
  """Imports TensorFlow and keeps it off the GPUs that JAX uses (it only feeds
  data), with its C++ start-up notices (oneDNN, CPU features, 'All log messages before
  absl::InitializeLog()') off stderr: they come before any log level applies, whatever
  TF_CPP_MIN_LOG_LEVEL says, and would bury a one-line error. Exceptions still raise."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      tf.config.set_visible_devices([], "GPU")
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def _initialize_distributed(flag_values: flags.FlagValues) -> int:
  """`jax.distributed.initialize` as --jax_distributed and the coordinator flags say (those
  given, the others left to the cluster environment).

  Returns:
    0, or the usage status after printing the error: coordinator flags without
    --jax_distributed, or settings that jax refuses (no coordinator address outside a
    cluster, a process id out of range).
  """
  given = {name: flag_values[name].value for name in
           ("coordinator_address", "num_processes", "process_id")
           if flag_values[name].value is not None}
  if not flag_values.jax_distributed:
    if given:
      return error(f"--{', --'.join(given)} given without --jax_distributed", USAGE)
    return 0
  try:
    jax.distributed.initialize(**given)
  except (ValueError, TypeError) as e:
    return error(f"--jax_distributed: {e}", USAGE)
  return 0


def main(argv):
  if len(argv) > 1:
    return error(f"unexpected arguments {argv[1:]}", USAGE)
  _start_tensorflow_quietly()
  logs.quiet_libraries()
  status = _initialize_distributed(FLAGS)
  if status:
    return status
  return run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
