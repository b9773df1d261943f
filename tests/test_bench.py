"""The benchmark command's figures exist and are consistent (speed targets live in the
command itself, not in tests)."""

import pytest

from digit_vit import bench, config_lib


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


def test_matmul_peak_is_measured():
  peak = bench.matmul_peak_gflops(repeats=1, n=256)
  assert peak["numpy_peak_gflops"] > 0 and peak["xla_peak_gflops"] > 0


def test_format_lists_every_key(figures):
  text = bench.format_results(figures)
  assert all(key in text for key in figures)
