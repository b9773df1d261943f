"""Loading config files and checking them.

Configs are ml_collections `get_config()` files under `configs/`; derived configs (tiny, bench,
long) start from `default.py` through `load` so every field is defined, and commented, once.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


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
