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


@pytest.fixture(scope="session")
def classifier_workdir(tmp_path_factory):
  """A single-digit classifier run on the embedded digits (60 steps; checkpoints of steps 50
  and 60 kept)."""
  from digit_vit import config_lib, train  # pylint: disable=import-outside-toplevel
  config = config_lib.load(ROOT / "configs" / "tiny.py")
  config.task, config.image_height, config.image_width = "classify", 28, 28
  config.num_train_steps, config.learning_rate = 60, 3e-3
  config.eval_splits = ("test",)
  config.data.name = "mnist_digits"
  config.model.patch_size = (7, 7)
  workdir = tmp_path_factory.mktemp("classifier")
  train.train_and_evaluate(config, str(workdir))
  return workdir
