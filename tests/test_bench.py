"""The benchmark command's figures exist and are consistent (speed targets live in the
command itself, not in tests)."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from digit_vit import bench, config_lib, decode, environment
from digit_vit.models import ModelConfig, build_model, tokens

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
  config = config_lib.load("tiny")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return bench.run(config, parts=("train", "eval", "decode", "pipeline"), repeats=2)


def test_every_figure_is_there_and_positive(figures):
  for key in ("train_images_per_s", "train_flops_per_image", "train_compile_s",
              "eval_images_per_s", "decode_images_per_s", "decode_uncached_images_per_s",
              "decode_beam4_images_per_s", "pipeline_images_per_s", "peak_rss_mb",
              "parameters"):
    assert figures[key] > 0, key
  assert (figures["train_images_per_s_min"] <= figures["train_images_per_s"]
          <= figures["train_images_per_s_max"])
  assert figures["pipeline_over_train"] == pytest.approx(
      figures["pipeline_images_per_s"] / figures["train_images_per_s"])


def test_training_costs_more_flops_than_the_forward_pass(figures):
  # Backward is about twice the forward; XLA's count includes the optimiser too.
  assert 2.0 < figures["train_flops_per_image"] / figures["eval_flops_per_image"] < 5.0


def test_decoding_flops_add_up_from_its_parts(figures):
  # Full-length decoding: the cache saves re-running the prefix; beam 4 steps 4x the rows
  # but runs the encoder once per image.
  cached = figures["decode_flops_per_image"]
  assert cached < figures["decode_uncached_flops_per_image"]
  assert cached < figures["decode_beam4_flops_per_image"] < 4 * cached


def test_full_length_params_never_emit_eos():
  config = config_lib.load("tiny")
  model = build_model(config)
  images = np.random.default_rng(0).random((4, 16, 48, 1), np.float32)
  params = model.init(jax.random.key(0), images, np.zeros((4, 4), np.int32))["params"]
  # A model that prefers <eos> everywhere: without the change every row stops at once.
  bias = params["decoder"]["logits"]["bias"]
  params["decoder"]["logits"]["bias"] = bias.at[tokens.EOS].set(10.0)
  model_config = ModelConfig.from_config(config.model)
  outputs, _ = decode.greedy_decode(model_config, params, images)
  assert (np.asarray(outputs)[:, 0] == tokens.EOS).all()
  outputs, _ = decode.greedy_decode(model_config, bench.full_length_params(params), images)
  assert not (np.asarray(outputs) == tokens.EOS).any()


def test_matmul_peak_is_measured():
  peak = bench.matmul_peak_gflops(repeats=1, n=256)
  assert peak["numpy_peak_gflops"] > 0 and peak["xla_peak_gflops"] > 0


def test_unpinned_numpy_peak_is_measured_only_where_openblas_is_pinned(monkeypatch):
  for name in bench.OPENBLAS_PINS:
    monkeypatch.delenv(name, raising=False)
  assert bench.unpinned_numpy_matmul_gflops(repeats=1, n=128) is None
  monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
  assert bench.unpinned_numpy_matmul_gflops(repeats=1, n=128) > 0
  assert bench.matmul_peak_gflops(repeats=1, n=128)["numpy_unpinned_peak_gflops"] > 0


def test_format_lists_every_key(figures):
  text = bench.format_results(figures)
  assert all(key in text for key in figures)


def test_the_command_writes_its_figures_and_environment(tmp_path):
  out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-m", "digit_vit.bench", f"--config={ROOT / 'configs' / 'tiny.py'}",
       "--only=train", "--repeats=1", f"--json={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  written = json.loads(out.read_text())
  assert written["train_images_per_s"] > 0 and written["parameters"] > 0
  assert written["environment"]["cpu"] == environment.cpu_model()
  assert f"cpu: {environment.cpu_model()}" in result.stdout
