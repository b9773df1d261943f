r"""Trains and evaluates from a config file.

  python -m digit_vit.main --config=configs/default.py --workdir=runs/default \
      [--config.learning_rate=3e-4 ...] [--jax_distributed]

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
from digit_vit.data import sources

FLAGS = flags.FLAGS

USAGE, FAILURE = 2, 1


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
                    "Call jax.distributed.initialize() first (multi-host runs; the cluster "
                    "environment, e.g. SLURM or TPU pods, supplies the coordinator).",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def error(message: str, status: int) -> int:
  """Prints `error: message` on stderr as one line; returns the exit status to give."""
  print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
  return status


def _one_line(message: str) -> str:
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]  # A config file's own exception, which config_flags wraps in its trace.
  return " ".join(lines)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """absl's flag parsing, but a bad flag, config file or override is one line on stderr and
  exit status 2 (absl prints a traceback or a 'FATAL' block and exits with 1).

  Returns:
    the arguments left after the flags (argv[0] first), for `main`.
  """
  try:
    rest = flag_values(argv)
    config = flag_values.config
    if not isinstance(config, ml_collections.ConfigDict):
      # config_flags defers a config file's load error to the first use of the config.
      load_error = getattr(config, "_error", None)
      detail = str(load_error).splitlines()[-1].strip() if load_error else "cannot be loaded"
      sys.exit(error(f"--config: {detail} (config files live in {config_lib.CONFIG_DIR})",
                     USAGE))
  except (KeyError, AttributeError) as e:
    # An override of a field the config does not have: ml_collections raises a KeyError
    # (wrapped in an AttributeError below the top level) that suggests the nearest name.
    cause = e.args[0] if isinstance(e, AttributeError) and e.args else e
    if not isinstance(cause, KeyError):
      sys.exit(error(str(e), USAGE))
    field, _, suggestion = str(cause.args[0] if cause.args else cause).partition("\n")
    suggestion = f": {_one_line(suggestion)}" if suggestion.strip() else ""
    sys.exit(error(f"no config field {field} (in a --config.* override){suggestion}", USAGE))
  except (flags.Error, OSError, ValueError, TypeError) as e:
    sys.exit(error(str(e), USAGE))
  return rest


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


def main(argv):
  if len(argv) > 1:
    return error(f"unexpected arguments {argv[1:]}", USAGE)
  _start_tensorflow_quietly()
  logs.quiet_libraries()
  if FLAGS.jax_distributed:
    jax.distributed.initialize()
  return run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
