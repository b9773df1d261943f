"""Loading config files and checking them.

Configs are ml_collections `get_config()` files under `configs/`; derived configs (tiny, bench,
long) start from `default.py` through `load` so every field is defined, and commented, once.

The errors a config can cause before anything runs are `ConfigError`s (a ValueError): a value
out of range (`config_checks.check_config`), or a rerun whose config the run in its --workdir
cannot resume (`ConfigMismatchError`, from `check_resume`). `python -m digit_vit.main` prints
them as one line and exits with status 2.

This module touches no devices (tests/test_configs.py runs once, not per device count).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any, Mapping

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

# The fields a rerun in an existing run's --workdir may change; any other difference stops it
# (`check_resume`). None of them changes the model, its parameters' shapes, the examples or
# their order, so the checkpoints stay valid and `predict`, `evaluate` and the demo keep
# reading the run. A prefix ending in '.' covers a whole section.
RESUMABLE_FIELDS = (
    # Extends (or shortens) the run. The learning-rate schedule is recomputed for the new
    # length, so from the resumed step on it follows the longer schedule.
    "num_train_steps",
    # What is logged, evaluated and kept, and how often: no effect on the updates.
    "progress_bar", "log_every_steps", "eval_every_steps", "num_eval_examples", "eval_splits",
    "eval_batch_size", "checkpoint_every_steps", "keep_checkpoints", "keep_best_checkpoints",
    # How the final report, predict, evaluate and the demo read (beam, views).
    "decode.",
    # The data-parallel implementation: both make the same update (train.py's docstring).
    "parallelism",
    # Where the built dataset is cached (its name hashes every setting that makes the examples)
    # and how fast tf.data feeds it.
    "data.data_dir", "data.eval_lines_dir", "data.num_parallel_calls", "data.threads", "data.prefetch",
)


# Options removed from the code, each with the value at which a run that had it behaved as the
# code does now (docs/results.md says why they went). Runs saved before carry them in their
# config.json: at those values they are dropped on reading (`drop_removed`) and match on a
# resume; at any other value they stay, so the model cannot be rebuilt silently without them.
REMOVED_FIELDS = {"model.stem_full_res_depth": 0, "model.stem_antialias": False,
                  "data.augment.keep_inside": False, "sam_rho": 0.0}


class ConfigError(ValueError):
  """A config a run cannot start with; the message names the field and what to set."""


class ConfigMismatchError(ConfigError):
  """A rerun in a --workdir whose run was trained with another config."""


def import_file(path_or_name: str | pathlib.Path, directory: pathlib.Path, what: str):
  """Imports a Python file given its path or its bare name in `directory` (`what` names the
  kind of file in the error)."""
  path = pathlib.Path(path_or_name)
  if path.suffix != ".py" and not path.exists():
    path = directory / f"{path}.py"
  if not path.exists():
    raise FileNotFoundError(f"no {what} file at {path}; {what}s live in {directory}")
  spec = importlib.util.spec_from_file_location(f"digit_vit_{what}_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of a config file.

  Args:
    path: a file path, or a bare name such as 'tiny' for `configs/tiny.py`.
    arg: the text after ':' on the command line (`--config=configs/default.py:quick`).
  """
  module = import_file(path, CONFIG_DIR, "config")
  return module.get_config(arg) if arg is not None else module.get_config()


def read_by_the_decoder_alone(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns off the CTC head that configs/default.py trains and reads with (`model.ctc_head`,
  `loss.ctc_weight`, `decode.reader='joint'`): the model, loss and reading of the decoder
  alone, as every config was before the head became the default. Returns `config`, changed."""
  config.model.ctc_head = False
  config.loss.ctc_weight = 0.0
  config.decode.reader = "decoder"
  return config


def drop_removed(saved: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config (a run's config.json, parsed) without the `REMOVED_FIELDS` it holds at
  their neutral values, so that today's code reads runs saved before they were removed. The
  argument is not changed."""
  return drop_neutral(saved, REMOVED_FIELDS)


def drop_neutral(saved: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
  """A deep copy of a saved config (plain JSON values) without each dotted field of `fields`
  that it holds at the neutral value `fields` gives it."""
  out = json.loads(json.dumps(saved))
  for dotted, neutral in fields.items():
    *parents, leaf = dotted.split(".")
    section = out
    for key in parents:
      section = section.get(key) if isinstance(section, Mapping) else None
    if isinstance(section, Mapping) and leaf in section and section[leaf] == neutral:
      del section[leaf]
  return out


def resumable(field: str) -> bool:
  """Whether a dotted config field (e.g. 'decode.beam_size') may change on a resume."""
  return any(field == f or (f.endswith(".") and field.startswith(f)) for f in RESUMABLE_FIELDS)


def flatten(config: Mapping[str, Any] | ml_collections.ConfigDict,
            prefix: str = "") -> dict[str, Any]:
  """{'model.width': 128, ...}: the leaves of a config (or its JSON dict) by dotted name.

  A ConfigDict goes through its JSON form first, as `config.json` holds it (tuples become
  lists), so a config and the JSON saved from it flatten alike."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  flat = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def resume_differences(saved: Mapping[str, Any], config) -> list[str]:
  """The fields where `config` differs from a run's saved config and a resume cannot follow.

  Args:
    saved: the run's `config.json`, parsed.
    config: the config of the rerun (ConfigDict or dict).

  Returns:
    'field: saved -> new' for each such field, sorted; [] when the rerun may resume. Fields in
    `RESUMABLE_FIELDS` may differ. A field the saved config lacks (added to the code after the
    run started) matches when the rerun leaves it at its `configs/default.py` value, which
    keeps the behaviour from before the field existed; a field only the saved config has
    (removed from the code since) never matches, unless it is one of `REMOVED_FIELDS` at its
    neutral value.
  """
  old, new = flatten(drop_removed(saved)), flatten(config)
  defaults = None
  missing = object()
  differences = []
  for field in sorted(set(old) | set(new)):
    if resumable(field):
      continue
    before, after = old.get(field, missing), new.get(field, missing)
    if before is missing:
      if defaults is None:
        defaults = flatten(load("default"))
      if defaults.get(field, missing) == after:
        continue
    if before != after:
      differences.append(f"{field}: {_show(before, missing)} -> {_show(after, missing)}")
  return differences


def _show(value, missing) -> str:
  return "(none)" if value is missing else json.dumps(value)


def check_resume(workdir: str | os.PathLike, config, *, has_checkpoints: bool) -> None:
  """Raises ConfigMismatchError unless `config` may run in `workdir`.

  A rerun in a --workdir resumes the run there, so it must train the same model on the same
  data as the run's saved `config.json`: only `RESUMABLE_FIELDS` may differ. Nothing is written
  here, so a refused rerun leaves the run as it was (config.json and checkpoints), and
  `predict`, `evaluate` and the demo keep reading it. A workdir without a checkpoint (a run
  stopped before its first one) has nothing to keep consistent: any config may start there.

  Args:
    workdir: the run's directory (need not exist).
    config: the config of the rerun.
    has_checkpoints: whether `workdir` holds a checkpoint.
  """
  path = pathlib.Path(workdir) / "config.json"
  if not has_checkpoints or not path.is_file():
    return
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise ConfigMismatchError(
        f"{path} cannot be read ({error}), so its checkpoints cannot be matched to this config; "
        "use a new --workdir") from None
  differences = resume_differences(saved, config)
  if differences:
    shown = "; ".join(differences[:10])
    more = f"; and {len(differences) - 10} more" if len(differences) > 10 else ""
    raise ConfigMismatchError(
        f"--workdir {workdir} holds a run trained with another config ({shown}{more}): its "
        "checkpoints cannot resume this one, and the run was left untouched. Use a new "
        "--workdir, or rerun with the saved config.json's values (only "
        "num_train_steps and evaluation, logging, checkpointing and reading settings may "
        "change on a resume)")
