"""What the command lines share: one flag style, the flags of reading with a model, and the
one-line errors.

Every command (`python -m digit_vit.<command>`, `python -m experiments.run`) defines its absl
flags in `define_flags(flag_values=FLAGS)`, called from its `if __name__ == "__main__":` block,
never on import: absl flags are global, and a process that imports several commands (a test,
a notebook) would define --workdir twice. Then

  app.run(main, flags_parser=cli.parse_flags)

so that a bad flag, value or config file is one line `error: ...` on stderr and exit status 2
(`USAGE`), like every other mistake on a command line, and --help (-h) exits 0. The flags that
several commands take (the run to read, its checkpoint, the decoding, the ensemble, the
confidence threshold) are defined here once, by `define_reader_flags`. A test runs a command in
its own process with `call`, or parses its flags with `parse` (a fresh FlagValues each time).
"""

from __future__ import annotations

import inspect
import math
import sys
import types
from typing import NoReturn, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from digit_vit import config_lib

FLAGS = flags.FLAGS

# Exit statuses: a mistake on the command line (nothing was done), and a failure.
USAGE, FAILURE = 2, 1

_HELP = ("-h", "-?", "--help", "--helpshort")

# The flags defined below belong to the command that asks for them: its --help lists them.
flags.disclaim_key_flags()


def error(message: str, status: int) -> int:
  """Prints `error: message` on stderr as one line; returns the exit status to give."""
  print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
  return status


def usage_error(message: str) -> NoReturn:
  """Ends a command on a mistake in its command line: the one line on stderr, exit status 2
  (absl's app.UsageError would print every flag's help before it, and exit with 1)."""
  sys.exit(error(message, USAGE))


def _one_line(message: str) -> str:
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]  # A config file's own exception, which config_flags wraps in its trace.
  return " ".join(lines)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """absl's flag parsing, but a bad flag, value, config file or override is one line on stderr
  and exit status 2 (absl prints a traceback or a 'FATAL' block and exits with 1), and --help
  prints the command's flags and exits 0.

  Returns:
    the arguments left after the flags (argv[0] first), for `main`.
  """
  argv = list(argv)
  if any(arg in _HELP for arg in argv[1:argv.index("--") if "--" in argv else len(argv)]):
    _print_help(flag_values)
    sys.exit(0)
  try:
    rest = flag_values(argv)
    config = flag_values.config if "config" in flag_values else None
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
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


def _print_help(flag_values: flags.FlagValues) -> None:
  """The command's docstring and flags (absl's --helpshort) on stdout; a FlagValues of a test
  has no command module: all of its flags."""
  if flag_values is FLAGS:
    app.usage(shorthelp=True, writeto_stdout=True)
  else:
    print(flag_values.get_help())


def parse(command: types.ModuleType, args: Sequence[str] = ()) -> flags.FlagValues:
  """The flags of `command` (a module with `define_flags(flag_values)`) parsed from `args`
  (its command line without the program name) into a FlagValues of their own, as
  `parse_flags` parses them: a mistake exits."""
  return _parsed(command, args)[0]


def call(command: types.ModuleType, args: Sequence[str] = ()) -> int:
  """Runs `command` on `args` in this process, as `python -m <command> args...` would (for a
  command whose `main(argv, flag_values)` reads the flags it is given): its exit status."""
  flag_values, rest = _parsed(command, args)
  return command.main(rest, flag_values)


def _parsed(command: types.ModuleType,
            args: Sequence[str]) -> tuple[flags.FlagValues, list[str]]:
  argv = [command.__name__, *args]
  flag_values = flags.FlagValues()
  if "argv" in inspect.signature(command.define_flags).parameters:  # A --config's overrides.
    command.define_flags(flag_values, argv=argv)
  else:
    command.define_flags(flag_values)
  return flag_values, parse_flags(argv, flag_values)


# ----------------------------------------------------------------------------------------------
# Reading with a model: predict, evaluate, error_analysis, export, demo


class _CheckpointParser(flags.ArgumentParser):
  """'best', 'latest' or a step number (`trained.parse_checkpoint`)."""

  def parse(self, argument):
    from digit_vit import trained  # pylint: disable=import-outside-toplevel  (jax, orbax)
    return trained.parse_checkpoint(str(argument))

  def flag_type(self):
    return "checkpoint"


class _CheckpointListParser(flags.ListParser):
  """Comma-separated checkpoints, each 'best', 'latest' or a step number."""

  def parse(self, argument):
    return [_CheckpointParser().parse(c) for c in super().parse(argument)]


class _RunListParser(flags.ListParser):
  """Comma-separated runs, WORKDIR or WORKDIR@CHECKPOINT; empty items (a trailing comma) are
  left out."""

  def parse(self, argument):
    return [run for run in super().parse(argument) if run]


class _ProbabilityParser(flags.FloatParser):
  """A number in [0, 1]."""

  def parse(self, argument):
    try:
      value = super().parse(argument)
    except ValueError:
      value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN too.
      raise ValueError(f"expected a probability in [0, 1], got {argument!r}")
    return value


def define_reader_flags(flag_values: flags.FlagValues = FLAGS, *, model: bool = True,
                        several_checkpoints: bool = False, alpha: bool = True,
                        ensemble: bool = True, ema: bool = False,
                        min_confidence: bool = False) -> None:
  """The flags of a command that reads with a trained model.

  Always --workdir (a training run's directory, None unless given), --checkpoint ('best' by
  default; its value is parsed: 'best', 'latest' or an int step), --beam_size and --views
  (None: the run's config.decode). With
    model: --model, an exported reader's directory instead of --workdir (None);
    several_checkpoints: --checkpoint is a list (['best']), averaged parameter by parameter;
    alpha: --alpha, the beam length normalisation (None: the run's config);
    ensemble: --ensemble, further runs read along (a list, [] by default);
    ema: --ema (True), --noema reads a run's raw parameters rather than their moving average;
    min_confidence: --min_confidence, a probability in [0, 1] (0.0: none rejected).
  A bad --checkpoint or --min_confidence is a flag error (`parse_flags`: exit status 2).
  """
  flags.DEFINE_string("workdir", None, "A training run's directory (config.json, checkpoints/).",
                      flag_values=flag_values)
  if model:
    flags.DEFINE_string("model", None, "An exported reader's directory (python -m "
                        "digit_vit.export), instead of --workdir (neither: the released reader, "
                        "release/reader).", flag_values=flag_values)
  if several_checkpoints:
    flags.DEFINE(_CheckpointListParser(), "checkpoint", ["best"], "'best' (by validation), "
                 "'latest' or a step; several (commas) are averaged parameter by parameter.",
                 flag_values, flags.CsvListSerializer(","))
  else:
    flags.DEFINE(_CheckpointParser(), "checkpoint", "best", "'best' (by validation), 'latest', "
                 "or a step.", flag_values)
  flags.DEFINE_integer("beam_size", None, "Beam size (default: the run's config.decode; 1 = "
                       "greedy).", flag_values=flag_values)
  if alpha:
    flags.DEFINE_float("alpha", None, "Beam length normalisation (default: the run's config).",
                       flag_values=flag_values)
  flags.DEFINE_integer("views", None, "Test-time views: read this many shifted copies of each "
                       "image and average their probabilities (default: the run's "
                       "config.decode; 1 = the image alone).", flag_values=flag_values)
  if ema:
    flags.DEFINE_bool("ema", True, "Read with the moving average of the parameters where the "
                      "run kept one (config.ema_decay > 0); --noema reads the raw parameters.",
                      flag_values=flag_values)
  if ensemble:
    flags.DEFINE(_RunListParser(), "ensemble", [], "Further runs of the same task read "
                 "together with --workdir's model, WORKDIR or WORKDIR@CHECKPOINT (default: its "
                 "best): each token (or a classifier's label) is picked by the mean probability "
                 "over the models (and views).", flag_values, flags.CsvListSerializer(","))
  if min_confidence:
    flags.DEFINE(_ProbabilityParser(), "min_confidence", 0.0, "Mark readings whose "
                 "(calibrated) confidence is below this, in [0, 1], as rejected (0 = none).",
                 flag_values)


# ----------------------------------------------------------------------------------------------
# Looking at a config's dataset: data.build, data.preview, data.augment_audit


def define_data_flags(flag_values: flags.FlagValues = FLAGS,
                      argv: Sequence[str] | None = None) -> None:
  """--config, an experiment config file (required; `--config.x=...` overrides it, taken from
  `argv`, default sys.argv), and --data_dir, where its dataset is built (None: the config's
  data.data_dir)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  flag_values=flag_values, lock_config=False, sys_argv=argv)
  flags.mark_flag_as_required("config", flag_values=flag_values)
  flags.DEFINE_string("data_dir", None, "Where the dataset is built (default: "
                      "config.data.data_dir, else ./data/tfds).", flag_values=flag_values)
