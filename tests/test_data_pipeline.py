"""Input pipelines: train/eval iterators (determinism, resume, sharding, padding), augmentation,
classification (MNIST digits, CIFAR-10 with mock data), the throughput benchmark, and pipelines
built after their source files were edited. With one width bucket (48), the tiny config's widest;
several buckets: tests/test_width_buckets.py."""

import hashlib
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from digit_vit import config_lib
from digit_vit.data import augment_audit, benchmark, classification, input_pipeline as ip, sources
from digit_vit.models import tokens as tokens_lib


def _hash_rows(images):
  """Hashes of images given as uint8, or as float32 in [0, 1] (compared at uint8 precision)."""
  out = []
  for im in images:
    if im.dtype != np.uint8:
      im = np.round(np.asarray(im) * 255).astype(np.uint8)
    out.append(hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest())
  return out


def _line_hashes(batch):
  """Hashes of each row's line, cropped to its `width` (the padding dropped), real rows only."""
  rows = np.flatnonzero(batch.get("mask", np.ones(len(batch["width"]), bool)))
  return _hash_rows(batch["image"][r, :, :batch["width"][r]] for r in rows)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  config = config_lib.load("tiny")  # 512 / 96 / 100 lines of 1-3 digits, 16 high, <= 48 wide
  # One bucket (tiny's are (24, 48)): these tests count batches, epochs and shards as with a
  # fixed canvas; several buckets: tests/test_width_buckets.py.
  config.width_buckets = (48,)
  config.batch_size = 32
  config.eval_batch_size = 32
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  ip.get_dataset_builder(config)
  return config


def _take(it, n):
  return list(itertools.islice(it, n))


def test_train_batches(config):
  (batch,) = _take(ip.train_iterator(config, seed=0, process_index=0, process_count=1), 1)
  assert set(batch) == {"image", "tokens", "length", "width"}
  assert batch["image"].shape == (32, 16, 48, 1) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (32, 5) and batch["tokens"].dtype == np.int32
  assert batch["length"].shape == (32,) and batch["length"].dtype == np.int32
  assert batch["width"].shape == (32,) and batch["width"].dtype == np.int32
  img, width = batch["image"], batch["width"]
  assert img.min() == 0.0 and img.max() == 1.0
  assert np.all((img > 0.5).mean(axis=(1, 2, 3)) < 0.5)  # dark background, bright ink
  assert np.all(width % 8 == 0) and np.all((8 <= width) & (width <= 48))
  assert len(set(width.tolist())) > 1  # lines of their own widths, padded to the one bucket
  beyond = np.arange(48)[None, :] >= width[:, None]  # [32, 48]
  assert not img.transpose(0, 2, 1, 3)[beyond].any()  # zero beyond each line's width
  assert all(img[r, :, :width[r]].max() == 1.0 for r in range(32))  # ink within the width
  eos = np.argmax(batch["tokens"] == 11, axis=1)
  np.testing.assert_array_equal(eos, batch["length"] + 1)


def test_train_is_deterministic_and_seeded(config):
  a = _take(ip.train_iterator(config, seed=3, process_index=0, process_count=1), 4)
  b = _take(ip.train_iterator(config, seed=3, process_index=0, process_count=1), 4)
  c = _take(ip.train_iterator(config, seed=4, process_index=0, process_count=1), 4)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_an_epoch_is_a_permutation_and_epochs_differ(config):
  # 512 train lines / 32 = 16 batches an epoch.
  batches = _take(ip.train_iterator(config, seed=0, process_index=0, process_count=1), 32)
  builder = ip.get_dataset_builder(config)
  ds = tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False))
  all_hashes = sorted(_hash_rows(ex["image"] for ex in ds))
  epoch0 = sum((_line_hashes(b) for b in batches[:16]), [])
  epoch1 = sum((_line_hashes(b) for b in batches[16:]), [])
  assert sorted(epoch0) == sorted(epoch1) == all_hashes
  assert epoch0 != epoch1


@pytest.mark.parametrize("augment", [False, True])
def test_resume_from_start_step_is_exact(config, augment):
  config = config.copy_and_resolve_references()
  if augment:
    for k in ("affine_prob", "elastic_prob", "noise_prob", "contrast_prob"):
      config.data.augment[k] = 0.5
  full = _take(ip.train_iterator(config, seed=1, process_index=0, process_count=1), 20)
  resumed = _take(ip.train_iterator(config, seed=1, start_step=13, process_index=0,
                                    process_count=1), 7)  # crosses the epoch boundary at 16
  for x, y in zip(full[13:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("start_step", [0, 5, 13])
def test_length_curriculum_grows_and_resumes_exactly(config, start_step):
  config = config.copy_and_resolve_references()
  config.data.curriculum_examples = 320          # 10 batches of 32, then plain epochs
  config.data.curriculum_start_digits = 1
  full = _take(ip.train_iterator(config, seed=2, process_index=0, process_count=1), 16)
  longest = [int(b["length"].max()) for b in full]
  assert longest[:3] == [1, 1, 1]                 # the first third: single digits only
  assert longest[4:6] == [2, 2] and longest[7:10] == [3, 3, 3]
  assert all(n <= 3 for n in longest)             # tiny lines have at most 3 digits
  resumed = _take(ip.train_iterator(config, seed=2, start_step=start_step, process_index=0,
                                    process_count=1), 16 - start_step)
  for x, y in zip(full[start_step:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_curriculum_start_out_of_range_is_an_error():
  lines = ip.host_lines(np.array([1, 2, 3]), np.array([8, 16, 24]), (24,), limit=3,
                        process_index=0, process_count=1)
  with pytest.raises(ValueError, match="curriculum_start_digits=0 must be in 1..max_digits=3"):
    ip.TrainPlan(lines, batch_size=2, seed=0, process_index=0, max_digits=3,
                 curriculum_examples=4, curriculum_start_digits=0)
  # Lines of at most 1 digit asked for, none there: said before anything is drawn.
  lines = ip.host_lines(np.array([2, 2, 3]), np.array([8, 16, 24]), (24,), limit=3,
                        process_index=0, process_count=1)
  with pytest.raises(ValueError, match="lines of at most 1 digits but the train split has none"):
    ip.TrainPlan(lines, batch_size=2, seed=0, process_index=0, max_digits=3,
                 curriculum_examples=4, curriculum_start_digits=1)


def test_augmentation_changes_images_and_keeps_range(config):
  config = config.copy_and_resolve_references()
  plain = _take(ip.train_iterator(config, seed=0, process_index=0, process_count=1), 1)[0]
  a = config.data.augment
  a.affine_prob = a.elastic_prob = a.noise_prob = a.contrast_prob = 1.0
  aug = _take(ip.train_iterator(config, seed=0, process_index=0, process_count=1), 1)[0]
  np.testing.assert_array_equal(plain["tokens"], aug["tokens"])  # same examples, same order
  assert aug["image"].shape == plain["image"].shape and aug["image"].dtype == np.float32
  assert 0 <= aug["image"].min() and aug["image"].max() <= 1
  assert np.abs(aug["image"] - plain["image"]).mean() > 0.01
  # Distorted at the line's own width: the padding stays background.
  np.testing.assert_array_equal(aug["width"], plain["width"])
  beyond = np.arange(48)[None, :] >= aug["width"][:, None]
  assert not aug["image"].transpose(0, 2, 1, 3)[beyond].any()
  a.affine_prob = a.elastic_prob = a.noise_prob = a.contrast_prob = 0.0
  a.invert_prob = 1.0
  inv = _take(ip.train_iterator(config, seed=0, process_index=0, process_count=1), 1)[0]
  within = ~beyond[:, None, :, None]  # [32, 1, 48, 1]
  np.testing.assert_allclose(inv["image"], np.where(within, 1 - plain["image"], 0), atol=1e-6)


def test_clean_final_steps_stop_the_distortion_at_their_step(config):
  config = config.copy_and_resolve_references()
  plain = _take(ip.train_iterator(config, seed=3, process_index=0, process_count=1), 6)
  a = config.data.augment
  a.affine_prob = a.elastic_prob = 1.0
  config.num_train_steps, a.clean_final_steps = 6, 2
  mixed = _take(ip.train_iterator(config, seed=3, process_index=0, process_count=1), 6)
  for step in range(4):  # distorted up to step num_train_steps - clean_final_steps ...
    assert np.abs(mixed[step]["image"] - plain[step]["image"]).mean() > 0.01
  for step in (4, 5):    # ... and from there on the lines as they are
    np.testing.assert_allclose(mixed[step]["image"], plain[step]["image"], atol=1e-6)
  resumed = _take(ip.train_iterator(config, seed=3, start_step=3, process_index=0,
                                    process_count=1), 3)
  for x, y in zip(mixed[3:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
  a.clean_final_steps = 7
  with pytest.raises(ValueError, match="clean_final_steps=7 must be in 0..num_train_steps=6"):
    ip.train_iterator(config, seed=3, process_index=0, process_count=1)


def _edge_line():
  """A 32x192 line whose two 3x3 'digits' sit 1 pixel from the left and right edges."""
  image = np.zeros((32, 192, 1), np.float32)
  image[14:17, 1:4] = image[14:17, 188:191] = 1.0
  bboxes = np.array([[14, 1, 17, 4], [14, 188, 17, 191]], np.float32) / [32, 192, 32, 192]
  return image, bboxes


def _strong_affine():
  return ml_collections.ConfigDict(dict(max_rotation=10.0, max_scale_change=0.1, max_shear=0.15,
                                        max_translate=0.1))


def test_ink_lost_counts_the_ink_a_shift_moves_off_the_canvas():
  image, _ = _edge_line()
  image[14:17, 180:190] = 1.0  # A third digit, 10 columns, ending at column 189.
  bboxes = np.array([[14, 1, 17, 4], [14, 188, 17, 191], [14, 180, 17, 190]]) / [32, 192, 32, 192]
  # in = out - 6: everything moves 6 pixels right, so columns > 185 land past column 191.5.
  shift_right = np.array([1, 0, -6, 0, 1, 0, 0, 0], np.float32)
  lost = augment_audit.ink_lost(image, bboxes, shift_right)
  # The third digit loses its columns 186-189 (4 of 10), the second all of its 188-190.
  np.testing.assert_allclose(lost, [0.0, 1.0, 0.4])


def test_strong_affine_maps_carry_edge_digits_off_the_canvas():
  """What `augment_audit` measures: shifts of up to 19 pixels carry a blob 1 pixel from the
  edge right off the canvas, and `ink_lost` sees it go."""
  image, bboxes = _edge_line()
  lost, kept = [], []
  for seed in range(60):
    transform = ip.affine_transform(tf.constant(image), tf.constant([seed, 0]), _strong_affine())
    lost.append(augment_audit.ink_lost(image, bboxes, transform.numpy()))
    out = ip.apply_transform(tf.constant(image), transform).numpy()
    kept.append([out[:, :96].sum() / 9, out[:, 96:].sum() / 9])
  lost, kept = np.array(lost), np.array(kept)
  assert (lost == 1.0).any() and (kept < 0.1).any()


def test_augment_audit_reports_cut_digits(config):
  config = config.copy_and_resolve_references()
  # Shifts are fractions of each line's own (natural) width, and lines have margins: 0.3 makes
  # cuts common on tiny's short lines (seed 0: a quarter of the lines lose > 25% of a digit).
  config.data.augment.max_translate = 0.3
  builder = ip.get_dataset_builder(config)
  examples = list(tfds.as_numpy(builder.as_dataset(split="train[:64]", shuffle_files=False)))
  args = ([ex["image"] for ex in examples], [ex["bboxes"] for ex in examples],
          [int(ex["length"]) for ex in examples])
  worst = augment_audit.worst_loss_per_line(*args, config.data.augment)
  assert worst.shape == (64,) and (worst > 0.25).mean() > 0.1


# Runs in a fresh process on a copy of the package: reads two training batches of each pipeline,
# after editing the copy's sources when asked (as a researcher does while a run trains).
_PIPELINES_SCRIPT = textwrap.dedent("""
    import hashlib, itertools, json, pathlib, sys
    package_root, overrides, edit = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "edit"
    sys.path.insert(0, package_root)
    from digit_vit import config_lib
    from digit_vit.data import classification, input_pipeline as ip
    assert ip.__file__.startswith(package_root), ip.__file__
    if edit:  # after import, before any pipeline is built: every def and lambda moves 8 lines
      for module in (ip, classification):
        path = pathlib.Path(module.__file__)
        path.write_text("# edited\\n" * 8 + path.read_text())
    out = {}
    for name, flat in overrides.items():
      config = config_lib.load("tiny")
      for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
          node = node[p]
        node[leaf] = value
      module = classification if config.task == "classify" else ip
      batches = itertools.islice(module.train_iterator(config, seed=5, process_index=0,
                                                       process_count=1), 2)
      out[name] = [hashlib.sha1(b["image"].tobytes()).hexdigest() for b in batches]
    print(json.dumps(out))
""")


@pytest.mark.parametrize("pipeline", ["lines", "digits"])
def test_pipelines_built_after_their_source_was_edited(config, tmp_path, pipeline):
  # tf.data's autograph re-reads a mapped function's source from disk on first trace; without
  # input_pipeline.graph_fn the lines pipeline dies with `tf__load() missing 1 required
  # positional argument` and the digits one warns that autograph could not transform `load`.
  package_root, repo = tmp_path / "copy", pathlib.Path(ip.__file__).parents[2]
  for part in ("digit_vit", "configs"):
    shutil.copytree(repo / part, package_root / part, ignore=shutil.ignore_patterns("__pycache__"))
  overrides = {pipeline: {
      "lines": {"batch_size": 32, "data.data_dir": config.data.data_dir,
                "data.augment.affine_prob": 0.5, "data.augment.elastic_prob": 0.5},
      "digits": {"task": "classify", "batch_size": 64, "data.name": "mnist_digits",
                 "data.random_crop_padding": 2, "data.augment.affine_prob": 0.5},
  }[pipeline]}
  env = dict(os.environ, PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="2")
  hashes = {}
  for edit in ("as_is", "edit"):
    result = subprocess.run([sys.executable, "-c", _PIPELINES_SCRIPT, str(package_root),
                             json.dumps(overrides), edit], capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    # Where the edit does not crash it, autograph converts the wrong source or gives up, warning.
    assert "AutoGraph" not in result.stderr, result.stderr[-3000:]
    hashes[edit] = json.loads(result.stdout.strip().splitlines()[-1])[pipeline]
  assert len(set(hashes["as_is"])) == 2 and hashes["edit"] == hashes["as_is"]


def test_train_shards_per_process_are_disjoint_and_cover(config):
  # Every host takes an equal share of each length (170-171 lines each here): 255 lines a host.
  builder = ip.get_dataset_builder(config)
  split = ip._read_shard(builder, "train", 0, 512, decode=False)  # pylint: disable=protected-access
  shares = [ip.host_lines(split["length"], split["width"], (48,), limit=3, process_index=p,
                          process_count=2) for p in range(2)]
  assert len(shares[0].examples) == len(shares[1].examples)
  assert 2 * len(shares[0].examples) >= 512 - 3  # at most one line of each length left over
  assert not set(shares[0].examples) & set(shares[1].examples)
  np.testing.assert_array_equal(shares[0].length, shares[1].length)
  shards = []
  for p in range(2):
    bs = _take(ip.train_iterator(config, seed=0, process_index=p, process_count=2), 15)
    assert bs[0]["image"].shape[0] == 16  # host-local batch = 32 / 2
    shards.append(sum((_line_hashes(b) for b in bs), []))  # 240 of the host's 255 lines
  assert len(set(shards[0])) == len(set(shards[1])) == 240
  assert not set(shards[0]) & set(shards[1])
  want = {p: set(_hash_rows(ex["image"] for i, ex in enumerate(tfds.as_numpy(
      builder.as_dataset(split="train", shuffle_files=False))) if i in set(shares[p].examples)))
          for p in range(2)}
  assert set(shards[0]) <= want[0] and set(shards[1]) <= want[1]
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    ip.train_iterator(config, seed=0, process_index=0, process_count=3)


def _dataset_rows(config, split):
  """(image float32 [16, W_i, 1] at its natural width, tokens) of each line of a split."""
  builder = ip.get_dataset_builder(config)
  ds = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
  return [(ex["image"].astype(np.float32) / 255, ex["tokens"]) for ex in ds]


def test_eval_covers_every_example_once_with_masks(config):
  rows = _dataset_rows(config, "test")
  assert ip.num_examples(config, "test") == len(rows) == 100
  batches = list(ip.eval_iterator(config, "test", process_index=0, process_count=1))
  assert len(batches) == 4  # 32 + 32 + 32 + 4 real rows
  for b in batches:
    assert b["image"].shape == (32, 16, 48, 1) and b["mask"].dtype == bool
    assert b["tokens"].shape == (32, 5) and b["length"].shape == (32,)
    assert b["width"].dtype == b["index"].dtype == np.int32
  np.testing.assert_array_equal([b["mask"].sum() for b in batches], [32, 32, 32, 4])
  assert not batches[-1]["mask"][4:].any() and batches[-1]["mask"][:4].all()
  last = batches[-1]
  assert (last["index"][4:] == -1).all() and (last["width"][4:] == 0).all()
  assert not last["image"][4:].any()
  # One bucket: the split's order, each line at the left of its row, zeros beyond its width.
  index = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(index, np.arange(100))
  widths = np.concatenate([b["width"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(widths, [r[0].shape[1] for r in rows])
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  for image, width, row in zip(images, widths, rows):
    np.testing.assert_allclose(image[:, :width], row[0], atol=1e-6)
    assert not image[:, width:].any()
  tokens = np.concatenate([b["tokens"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(tokens, np.stack([r[1] for r in rows]))


def test_line_sources_follow_the_eval_order(config):
  lines = ip.line_sources(config, "test")
  assert lines["source_ids"].shape == (100, 3) and lines["source_ids"].dtype == np.int64
  batches = list(ip.eval_iterator(config, "test", process_index=0, process_count=1))
  tokens = np.concatenate([b["tokens"][b["mask"]] for b in batches])
  index = np.concatenate([b["index"][b["mask"]] for b in batches])
  assert list(lines["digits"][index]) == [tokens_lib.decode_sequence(t) for t in tokens]
  np.testing.assert_array_equal(lines["length"], [len(d) for d in lines["digits"]])
  widths = np.concatenate([b["width"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(lines["width"][index], widths)
  on_line = np.arange(3)[None, :] < lines["length"][:, None]
  assert (lines["source_ids"][~on_line] == -1).all()
  # Each id is a test digit of the embedded source whose label is the digit it stands for.
  digits = sources.load_digits("embedded", "test", validation_per_class=40)
  label = dict(zip(digits.ids.tolist(), digits.labels.tolist()))
  for line, ids, n in zip(lines["digits"], lines["source_ids"], lines["length"]):
    assert [label[i] for i in ids[:n].tolist()] == [int(c) for c in line]


def test_eval_shards_per_process_cover_once(config):
  rows = _hash_rows(r[0] for r in _dataset_rows(config, "validation"))  # 96 rows
  seen, counts = [], []
  for p in range(3):  # 96 / 3 hosts, global batch 30 -> host batch 10, 4 batches each
    batches = list(ip.eval_iterator(config, "validation", batch_size=30, process_index=p,
                                    process_count=3))
    counts.append(len(batches))
    assert all(b["image"].shape[0] == 10 for b in batches)
    seen += sum((_line_hashes(b) for b in batches), [])
  assert len(set(counts)) == 1
  assert sorted(seen) == sorted(rows)


def test_eval_with_fewer_examples_than_hosts_pads_whole_batches(config):
  # 100 test rows over 3 hosts: 33, 33, 34 -> same batch count everywhere.
  counts = [len(list(ip.eval_iterator(config, "test", batch_size=48, process_index=p,
                                      process_count=3))) for p in range(3)]
  assert counts == [3, 3, 3]


def test_benchmark_reports_a_rate(config):
  rate = benchmark.pipeline_images_per_second(config, num_batches=3, warmup_batches=1)
  assert rate > 0


# ---- classification


@pytest.fixture(scope="module")
def mnist_config():
  config = config_lib.load("tiny")
  config.task = "classify"
  config.batch_size = 64
  config.eval_batch_size = 128
  config.data.name = "mnist_digits"
  config.data.random_crop_padding = 2
  config.data.horizontal_flip = False
  config.data.mean = (0.1307,)
  config.data.std = (0.3081,)
  return config


def test_mnist_digits_classification(mnist_config):
  it = classification.train_iterator(mnist_config, seed=0, process_index=0, process_count=1)
  b = next(it)
  assert b["image"].shape == (64, 28, 28, 1) and b["image"].dtype == np.float32
  assert b["label"].shape == (64,) and b["label"].dtype == np.int32
  assert b["image"].min() == pytest.approx(-0.1307 / 0.3081, rel=1e-5)
  full = _take(classification.train_iterator(mnist_config, seed=0, process_index=0,
                                             process_count=1), 60)
  resumed = _take(classification.train_iterator(mnist_config, seed=0, start_step=55,
                                                process_index=0, process_count=1), 5)
  for x, y in zip(full[55:], resumed):  # 3600 / 64: crosses the epoch at 56.25
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert classification.num_examples(mnist_config, "test") == 1000
  first = list(classification.eval_iterator(mnist_config, "test", process_index=0,
                                            process_count=1, num_examples=200))
  assert [int(b["mask"].sum()) for b in first] == [128, 72]


def test_mnist_digits_test_split_is_rows_400_to_499(mnist_config):
  batches = list(classification.eval_iterator(mnist_config, "test", process_index=0,
                                              process_count=1))
  assert len(batches) == 8 and [int(b["mask"].sum()) for b in batches][-1] == 1000 - 7 * 128
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  pixels, csv_labels = sources.load_embedded_all()
  rows = np.arange(5000)[np.arange(5000) % 500 >= 400]
  np.testing.assert_allclose(images[..., 0], (pixels[rows] / 255 - 0.1307) / 0.3081, atol=1e-5)
  np.testing.assert_array_equal(labels, csv_labels[rows])


def test_mnist_digits_canvas_padding_and_distortions(mnist_config):
  config = ml_collections.ConfigDict(mnist_config.to_dict())
  config.data.mean, config.data.std = (), ()
  config.data.random_crop_padding = 0
  config.data.canvas_padding = 2
  plain = next(classification.train_iterator(config, seed=0, process_index=0, process_count=1))
  test = next(classification.eval_iterator(config, "test", process_index=0, process_count=1))
  for images in (plain["image"], test["image"]):
    assert images.shape[1:] == (32, 32, 1)
    assert not images[:, :2].any() and not images[:, -2:].any()
    assert not images[:, :, :2].any() and not images[:, :, -2:].any()
  pixels, _ = sources.load_embedded_all()
  np.testing.assert_allclose(test["image"][0, 2:30, 2:30, 0], pixels[400].reshape(28, 28) / 255,
                             atol=1e-6)
  config.data.augment.affine_prob = 1.0
  config.data.augment.elastic_prob = 1.0
  distorted = [next(classification.train_iterator(config, seed=0, process_index=0,
                                                  process_count=1)) for _ in range(2)]
  np.testing.assert_array_equal(distorted[0]["image"], distorted[1]["image"])  # deterministic
  np.testing.assert_array_equal(distorted[0]["label"], plain["label"])  # same order
  changed = np.abs(distorted[0]["image"] - plain["image"]).mean(axis=(1, 2, 3))
  assert (changed > 0.01).all() and 0.0 <= distorted[0]["image"].min() <= distorted[0][
      "image"].max() <= 1.0
  # The last of two steps undistorted: step 0 as distorted above, step 1 as without distortions.
  config.num_train_steps, config.data.augment.clean_final_steps = 2, 1
  ends_clean = classification.train_iterator(config, seed=0, process_index=0, process_count=1)
  np.testing.assert_array_equal(next(ends_clean)["image"], distorted[0]["image"])
  config.data.augment.affine_prob = config.data.augment.elastic_prob = 0.0
  undistorted = classification.train_iterator(config, seed=0, process_index=0, process_count=1)
  next(undistorted)
  step1, step1_undistorted = next(ends_clean), next(undistorted)
  np.testing.assert_array_equal(step1["label"], step1_undistorted["label"])
  np.testing.assert_allclose(step1["image"], step1_undistorted["image"], atol=1e-6)
  with pytest.raises(ValueError, match="canvas_padding"):
    config.data.canvas_padding = -1
    classification.num_examples(config, "test")


def test_cifar10_with_mock_data():
  config = config_lib.load("tiny")
  config.task = "classify"
  config.batch_size = 16
  config.eval_batch_size = 24
  config.data.name = "cifar10"
  config.data.validation_size = 10
  config.data.random_crop_padding = 4
  config.data.horizontal_flip = True
  config.data.mean = classification.CIFAR10_MEAN
  config.data.std = classification.CIFAR10_STD
  classification._CACHE.clear()  # pylint: disable=protected-access
  with tfds.testing.mock_data(num_examples=50):
    b = next(classification.train_iterator(config, seed=0, process_index=0, process_count=1))
    evals = list(classification.eval_iterator(config, "validation", process_index=0,
                                              process_count=1))
    test = list(classification.eval_iterator(config, "test", process_index=0, process_count=1))
    assert classification.num_examples(config, "train") == 40
  classification._CACHE.clear()  # pylint: disable=protected-access
  assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and b["label"].min() >= 0 and b["label"].max() <= 9
  # Crop padding shows as zero pixels, normalised: (0 - mean) / std per channel.
  pad_value = -np.asarray(classification.CIFAR10_MEAN) / np.asarray(classification.CIFAR10_STD)
  assert np.any(np.all(np.isclose(b["image"], pad_value, atol=1e-5), axis=-1))
  assert len(evals) == 1 and int(evals[0]["mask"].sum()) == 10 and evals[0]["image"].shape[0] == 24
  assert sum(int(t["mask"].sum()) for t in test) == 50


def test_unknown_classification_dataset():
  config = config_lib.load("tiny")
  config.batch_size = 8
  config.data.name = "imagenet"
  with pytest.raises(ValueError, match=r"config\.data\.name.*mnist_digits"):
    next(classification.train_iterator(config, seed=0, process_index=0, process_count=1))
