"""The `multi_digit_mnist` TFDS builder: features, targets, natural widths, determinism, split
hygiene, errors."""

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
  assert builder.info.features["image"].shape == (16, None, 1)
  lengths, widths = [], []
  for ex in _examples(builder, "train"):
    digits = ex["digits"].decode()
    n = int(ex["length"])
    lengths.append(n)
    width = ex["image"].shape[1]
    widths.append(width)
    assert ex["image"].shape == (16, width, 1) and ex["image"].dtype == np.uint8
    assert int(ex["width"]) == width and width % 8 == 0 and 8 <= width <= 48
    assert len(digits) == n and 1 <= n <= 3
    np.testing.assert_array_equal(ex["tokens"], tokens_lib.encode_digits(digits, 3))
    assert ex["tokens"].dtype == np.int32 and ex["tokens"].shape == (5,)
    assert np.all(ex["source_ids"][n:] == -1) and np.all(ex["source_ids"][:n] >= 0)
    assert np.all(ex["bboxes"][n:] == 0) and np.all(ex["bboxes"][:n, 2:] > ex["bboxes"][:n, :2])
    labels = sources.load_embedded_all()[1][ex["source_ids"][:n]]
    assert "".join(map(str, labels)) == digits  # the recorded digits are the ones drawn
  counts = np.bincount(lengths, minlength=4)[1:]
  assert counts.min() > 512 / 3 * 0.75, f"lengths not uniform: {counts}"
  # As wide as the line needs: longer lines are wider, and the widths vary.
  lengths, widths = np.array(lengths), np.array(widths)
  mean_width = [widths[lengths == n].mean() for n in (1, 2, 3)]
  assert mean_width[0] + 8 < mean_width[1] < mean_width[2] - 4, mean_width
  assert len(set(widths.tolist())) >= 4


def test_bboxes_are_normalised_to_each_lines_width(tiny):
  _, builder = tiny
  for ex in _examples(builder, "validation"):
    image, n = ex["image"][..., 0], int(ex["length"])
    h, w = image.shape
    boxes = np.round(ex["bboxes"][:n] * [h, w, h, w]).astype(int)
    assert (boxes[:, 3] <= w).all() and (boxes[:, 1] >= 0).all()
    near = np.zeros_like(image, bool)
    for y0, x0, y1, x1 in boxes:
      assert image[y0:y1, x0:x1].max() > 0  # each box holds ink at this width's scale
      near[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True
    # and no bright ink is further than a blur's reach from every box (faint noise may be).
    assert not (image[~near] > 128).any()


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


def test_elastic_digits_only_in_the_train_split():
  plain = multi_digit_mnist.MultiDigitMnistConfig.create(max_digits=3, height=16, width=48)
  elastic = multi_digit_mnist.MultiDigitMnistConfig.create(max_digits=3, height=16, width=48,
                                                            digit_elastic=1.0)
  assert elastic.name != plain.name
  for split in ("train", "validation", "test"):
    digits = sources.load_digits("embedded", split, validation_per_class=40)
    a, b = (list(multi_digit_mnist.generate_examples(bc, split, digits, 5))
            for bc in (plain, elastic))
    same = [x[1]["image"] == y[1]["image"] for x, y in zip(a, b)]
    assert all(same) == (split != "train"), split


def test_config_names_never_collide():
  base = multi_digit_mnist.MultiDigitMnistConfig.create(max_digits=3, height=16, width=48)
  same = multi_digit_mnist.MultiDigitMnistConfig.create(max_digits=3, height=16, width=48)
  assert base.name == same.name
  names = {base.name}
  changes = (dict(seed=1), dict(max_gap=0.7), dict(train_size=999),
             dict(validation_per_class=41), dict(width=56), dict(max_slant=0.2),
             dict(blur_prob=0.5), dict(max_overlap=0.1), dict(bottom_prob=0.1),
             dict(heavy_prob=0.0), dict(max_margin=0.3), dict(noise_prob=0.0),
             dict(digit_elastic=1.0))
  for change in changes:
    params = dict(max_digits=3, height=16, width=48) | change
    names.add(multi_digit_mnist.MultiDigitMnistConfig.create(**params).name)
  assert len(names) == len(changes) + 1
  # Every composition setting is a builder parameter, so it reaches the name's hash.
  assert set(multi_digit_mnist.STYLE_PARAMS) <= set(base.params())


def test_composition_settings_come_from_config_data(tmp_path):
  config = tiny_config(tmp_path)
  tiny = input_pipeline.builder_config_from(config)
  # tiny's plain lines: its config.data values, not the composer's defaults.
  assert (tiny.max_slant, tiny.thin_prob, tiny.heavy_prob, tiny.blur_prob, tiny.noise_prob) == (
      0.0, 0.0, 0.0, 0.0, 0.0)
  assert compose.Composition.max_slant == 0.3 and compose.Composition.thin_prob == 0.15
  assert tiny.max_overlap == config.data.max_overlap == 0.25  # inherited from default.py
  config.data.max_slant = 0.1
  config.data.thin_prob = 0.2
  changed = input_pipeline.builder_config_from(config)
  assert (changed.max_slant, changed.thin_prob) == (0.1, 0.2) and changed.name != tiny.name
  # A setting missing from config.data (an older config) takes compose.Composition's default.
  del config.data.max_slant
  missing = input_pipeline.builder_config_from(config)
  assert missing.max_slant == compose.Composition.max_slant and missing.thin_prob == 0.2
  assert missing.name not in (tiny.name, changed.name)


@pytest.mark.parametrize("change, message", [
    ({"max_digits": 0}, r"max_digits must be an integer >= 1.*config\.max_digits"),
    ({"image_width": 20, "max_digits": 8}, r"too small for max_digits=8.*config\.image_width >= 39"),
    ({"data.source": "mnist"}, r"unknown digit source 'mnist'.*config\.data\.source"),
    ({"data.source": "idx", "data.source_dir": "/nonexistent/mnist"},
     r"'idx' is unavailable.*/nonexistent/mnist.*does not exist.*'embedded'"),
    ({"data.source": "idx"}, r"source='idx' needs config\.data\.source_dir"),
    ({"data.train_size": 0}, r"config\.data\.train_size must be >= 1"),
    # 8 digits 16 pixels high are about 103 pixels wide (8 margin, 8 x 9.9 digits, 7 x 2.3
    # gaps, min_gap -0.2 to max_gap 0.6): fitting them into the widest bucket of 48 would
    # shrink them below min_scale.
    ({"max_digits": 8}, r"cannot hold the longest training line: 8 digits at height 16 are "
                        r"about 103 pixels wide.*add a width bucket >= 104 \(at least 80\).*"
                        r"or lower config\.max_digits to <= 4"),
    ({"width_buckets": (16, 32, 64)}, r"config\.image_width=48 must equal the widest of "
                                      r"config\.width_buckets=\(16, 32, 64\)"),
    ({"width_buckets": (32, 16, 48)}, r"config\.width_buckets=\(32, 16, 48\) must be strictly "
                                      r"ascending"),
    ({"width_buckets": (20, 48)}, r"config\.width_buckets \[20\] must be multiples of 8"),
    ({"width_buckets": (24, 48), "model.patch_size": (4, 16)},
     r"\[24\] must be multiples of 16.*patch_size\[1\] is 16"),
    ({"data.max_overlap": 0.7}, r"config\.data\.max_overlap must be in \[0, 0\.5\]"),
    ({"data.heavy_prob": 0.8, "data.thicken_prob": 0.3},  # tiny's pens are all 0: sum 1.1
     r"thin_prob, thicken_prob, heavy_prob must be >= 0 and sum to <= 1"),
])
def test_bad_configs_fail_at_once_saying_what_to_change(tmp_path, change, message):
  config = tiny_config(tmp_path / "tfds")
  for key, value in change.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  with pytest.raises((ValueError, sources.SourceUnavailableError), match=message):
    input_pipeline.get_dataset_builder(config)
  assert not list((tmp_path / "tfds").glob("multi_digit_mnist/*/*/dataset_info.json"))
