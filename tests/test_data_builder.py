"""The `multi_digit_mnist` TFDS builder: features, targets, determinism, split hygiene, errors."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from digit_vit import config_lib
from digit_vit.data import compose, input_pipeline, multi_digit_mnist, sources
from digit_vit.models import tokens as tokens_lib


def tiny_config(data_dir):
  config = config_lib.load("tiny")
  config.batch_size = 32
  config.data.data_dir = str(data_dir)
  return config


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp("tfds"))
  return config, input_pipeline.get_dataset_builder(config)


def test_tiny_features_and_targets(tiny):
  config, builder = tiny
  assert builder.builder_config.name.startswith("embedded_d3_16x48_n512-96-100_s0_")
  assert builder.version == multi_digit_mnist.VERSION and builder.info.release_notes
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {"train": 512, "validation": 96, "test": 100}
  lengths = []
  for ex in _examples(builder, "train"):
    digits = ex["digits"].decode()
    n = int(ex["length"])
    lengths.append(n)
    assert ex["image"].shape == (16, 48, 1) and ex["image"].dtype == np.uint8
    assert len(digits) == n and 1 <= n <= 3
    np.testing.assert_array_equal(ex["tokens"], tokens_lib.encode_digits(digits, 3))
    assert ex["tokens"].dtype == np.int32 and ex["tokens"].shape == (5,)
    assert np.all(ex["source_ids"][n:] == -1) and np.all(ex["source_ids"][:n] >= 0)
    assert np.all(ex["bboxes"][n:] == 0) and np.all(ex["bboxes"][:n, 2:] > ex["bboxes"][:n, :2])
    labels = sources.load_embedded_all()[1][ex["source_ids"][:n]]
    assert "".join(map(str, labels)) == digits  # the recorded digits are the ones drawn
  counts = np.bincount(lengths, minlength=4)[1:]
  assert counts.min() > 512 / 3 * 0.75, f"lengths not uniform: {counts}"


def test_targets_for_length_one_and_max(tiny):
  _, builder = tiny
  by_length = {}
  for ex in _examples(builder, "test"):
    by_length.setdefault(int(ex["length"]), ex)
  one, full = by_length[1], by_length[3]
  d = int(one["digits"].decode())
  np.testing.assert_array_equal(one["tokens"], [10, d, 11, 12, 12])
  d1, d2, d3 = (int(c) for c in full["digits"].decode())
  np.testing.assert_array_equal(full["tokens"], [10, d1, d2, d3, 11])


def test_two_builds_in_different_dirs_are_identical(tiny, tmp_path):
  config, builder = tiny
  other = input_pipeline.get_dataset_builder(config, str(tmp_path / "other"))
  assert other.data_dir != builder.data_dir
  for split in ("train", "validation", "test"):
    a, b = _examples(builder, split), _examples(other, split)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])


def test_no_test_digit_reaches_train_or_validation(tiny, monkeypatch):
  _, builder = tiny
  # By source id, in the built dataset.
  for split, want in (("train", 0), ("validation", 1), ("test", 2)):
    ids = np.concatenate([ex["source_ids"][:ex["length"]] for ex in _examples(builder, split)])
    assert np.all(sources.embedded_row_split(ids, 40) == want), split
  # By pixels: hash every digit image handed to the composer while generating each split, and
  # compare with the csv's rows 400-499 of each class, read independently.
  pixels = sources.load_embedded_all()[0]
  test_hashes = {hashlib.sha1(p.tobytes()).hexdigest() for p in pixels[np.arange(5000) % 500 >= 400]}
  seen = []
  real = compose.compose_line
  monkeypatch.setattr(compose, "compose_line",
                      lambda imgs, rng, comp: (seen.extend(hashlib.sha1(
                          np.ascontiguousarray(i).tobytes()).hexdigest() for i in imgs),
                                               real(imgs, rng, comp))[1])
  bc = builder.builder_config
  for split in ("train", "validation", "test"):
    seen.clear()
    digits = sources.load_digits("embedded", split, validation_per_class=bc.validation_per_class)
    for _ in multi_digit_mnist.generate_examples(bc, split, digits, 200):
      pass
    hit = set(seen) & test_hashes
    assert (len(hit) > 0) == (split == "test"), split


def test_config_names_never_collide():
  base = multi_digit_mnist.MultiDigitMnistConfig.create(max_digits=3, height=16, width=48)
  same = multi_digit_mnist.MultiDigitMnistConfig.create(max_digits=3, height=16, width=48)
  assert base.name == same.name
  names = {base.name}
  for change in (dict(seed=1), dict(max_gap=0.7), dict(train_size=999),
                 dict(validation_per_class=41), dict(width=49)):
    params = dict(max_digits=3, height=16, width=48) | change
    names.add(multi_digit_mnist.MultiDigitMnistConfig.create(**params).name)
  assert len(names) == 6


@pytest.mark.parametrize("change, message", [
    ({"max_digits": 0}, r"max_digits must be an integer >= 1.*config\.max_digits"),
    ({"image_width": 20, "max_digits": 8}, r"too small for max_digits=8.*config\.image_width >= 39"),
    ({"data.source": "mnist"}, r"unknown digit source 'mnist'.*config\.data\.source"),
    ({"data.source": "idx", "data.source_dir": "/nonexistent/mnist"},
     r"'idx' is unavailable.*/nonexistent/mnist.*does not exist.*'embedded'"),
    ({"data.source": "idx"}, r"source='idx' needs config\.data\.source_dir"),
    ({"data.train_size": 0}, r"config\.data\.train_size must be >= 1"),
])
def test_bad_configs_fail_at_once_saying_what_to_change(tmp_path, change, message):
  config = tiny_config(tmp_path / "tfds")
  for key, value in change.items():
    if key.startswith("data."):
      setattr(config.data, key[5:], value)
    else:
      setattr(config, key, value)
  with pytest.raises((ValueError, sources.SourceUnavailableError), match=message):
    input_pipeline.get_dataset_builder(config)
  assert not list((tmp_path / "tfds").glob("multi_digit_mnist/*/*/dataset_info.json"))
