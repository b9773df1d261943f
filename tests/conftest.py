"""Shared test setup: quiet TensorFlow, the repo root importable for `configs/`, and one
persistent JAX compilation cache for every test process."""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parent.parent

# Many tests compile the same programs (the tiny config's train step, its evaluation, the CLIs'
# subprocesses), each in a fresh closure or process; a compilation cache on disk, shared by the
# xdist workers, their subprocesses (they inherit the environment) and both passes of `make
# test`, compiles each once. Set here, before any test imports jax. The cache is keyed by the
# program, the compile options and the jax version, so stale entries are never hit; it lives in
# pytest's own ignored cache folder, at most 2 GB (least recently used entries go first). Only
# programs that took JAX's default 1 s to compile are kept (135 entries, 25 MB after a fresh
# clone's `make test` on 2026-12-06): with a size bound, every write lists the whole folder, and
# caching every eager op (thousands) made that slow.
# JAX_ENABLE_COMPILATION_CACHE=false turns it off.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(ROOT / ".pytest_cache" / "jax_compilation_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024 ** 3))
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

# The wild and long image files (1,400 lines, most of a minute to draw) are built once into
# pytest's cache folder and shared by every worker, both passes of `make test` and later runs
# (a split's folder name hashes everything that decides its images).
EVAL_LINES_DIR = str(ROOT / ".pytest_cache" / "eval_lines")


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A training run of configs/tiny.py (30 steps, seconds): config.json and checkpoints/."""
  from digit_vit import config_lib, train  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("tiny_run")
  config = config_lib.load(ROOT / "configs" / "tiny.py")
  config.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
  config.data.eval_lines_dir = EVAL_LINES_DIR
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope="session")
def eval_lines_dir():
  """The shared root of the wild and long image files (`config.data.eval_lines_dir`)."""
  return EVAL_LINES_DIR


@pytest.fixture(scope="session")
def tiny_export(tiny_workdir, tmp_path_factory):
  """(directory, manifest): the tiny run's latest checkpoint (the step its report.json
  measured), exported once (`digit_vit.export`). Tests that write into an export copy it."""
  from digit_vit import export  # pylint: disable=import-outside-toplevel
  directory = tmp_path_factory.mktemp("export") / "reader"
  manifest = export.export_reader(tiny_workdir, directory, checkpoint="latest")
  return directory, manifest


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
