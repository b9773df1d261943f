"""Shared test setup: quiet TensorFlow, and the repo root importable for `configs/`."""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A training run of configs/tiny.py (30 steps, seconds): config.json and checkpoints/."""
  from digit_vit import config_lib, train  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("tiny_run")
  config = config_lib.load(ROOT / "configs" / "tiny.py")
  config.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
  train.train_and_evaluate(config, str(workdir))
  return workdir
