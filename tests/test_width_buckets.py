"""Width buckets: lines at their natural width batched by bucket (train and eval), every host on
the same bucket at every step, exact resume, the config checks."""

import hashlib
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from digit_vit import config_lib
from digit_vit.data import input_pipeline as ip
from digit_vit.models import tokens as tokens_lib

BUCKETS = (16, 32, 48)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  config = config_lib.load("tiny")  # 512 / 96 / 100 lines of 1-3 digits, 16 high, <= 48 wide
  config.batch_size = 16
  config.eval_batch_size = 16
  config.width_buckets = BUCKETS
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  ip.get_dataset_builder(config)
  return config


def _take(it, n):
  return list(itertools.islice(it, n))


def _split(config, split):
  """The split's lines as stored: image uint8 [16, W_i, 1], digits, tokens, width."""
  builder = ip.get_dataset_builder(config)
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def _line_hash(image, width):
  line = np.round(np.asarray(image)[:, :width] * 255).astype(np.uint8)
  return hashlib.sha1(np.ascontiguousarray(line).tobytes()).hexdigest()


def _check_one_bucket(batch):
  """One bucket a batch: each real line needs it (the narrower one would not hold it), and the
  image is zero beyond each line's width (padding rows: zero throughout)."""
  image, width = batch["image"], batch["width"]
  real = batch.get("mask", np.ones(len(width), bool))
  bucket = image.shape[2]
  assert bucket in BUCKETS
  narrower = ([0] + list(BUCKETS))[BUCKETS.index(bucket)]
  assert ((width[real] > narrower) & (width[real] <= bucket)).all(), (bucket, width[real])
  beyond = np.arange(bucket)[None, :] >= np.where(real, width, 0)[:, None]
  assert not image.transpose(0, 2, 1, 3)[beyond].any()


def test_buckets_default_to_the_canvas_and_index_the_narrowest_that_holds():
  config = config_lib.load("tiny")
  assert ip.width_buckets(config) == (24, 48)  # tiny's own
  config.width_buckets = None  # unset: the one canvas, config.image_width
  assert ip.width_buckets(config) == (48,)
  config.width_buckets = BUCKETS
  assert ip.width_buckets(config) == BUCKETS
  np.testing.assert_array_equal(ip.bucket_index(np.array([8, 16, 24, 32, 40, 48]), BUCKETS),
                                [0, 0, 1, 1, 2, 2])
  with pytest.raises(ValueError, match="wider than the widest bucket 48"):
    ip.bucket_index(np.array([56]), BUCKETS)


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_covers_every_line_once_one_bucket_a_batch(config, split):
  lines = _split(config, split)
  n = len(lines)
  batches = list(ip.eval_iterator(config, split, process_index=0, process_count=1))
  widths = [b["image"].shape[2] for b in batches]
  assert widths == sorted(widths) and len(set(widths)) == 3  # narrowest first, all three used
  counts = np.bincount(ip.bucket_index([int(x["width"]) for x in lines], BUCKETS), minlength=3)
  assert len(batches) == sum(-(-c // 16) for c in counts)
  seen = []
  for b in batches:
    _check_one_bucket(b)
    assert (b["index"][~b["mask"]] == -1).all() and not b["image"][~b["mask"]].any()
    for r in np.flatnonzero(b["mask"]):
      i = int(b["index"][r])
      seen.append(i)
      line = lines[i]
      assert b["width"][r] == line["width"] == line["image"].shape[1]
      np.testing.assert_allclose(b["image"][r, :, :b["width"][r]], line["image"] / 255,
                                 atol=1e-6)
      np.testing.assert_array_equal(b["tokens"][r], line["tokens"])
      assert tokens_lib.decode_sequence(b["tokens"][r]) == line["digits"].decode()
  assert sorted(seen) == list(range(n))  # every line exactly once
  # line_sources stays in split order; `index` finds each row's line there.
  sources = ip.line_sources(config, split)
  assert [sources["digits"][i] for i in seen] == [
      tokens_lib.decode_sequence(t) for b in batches for t in b["tokens"][b["mask"]]]


def test_eval_hosts_share_buckets_and_cover_the_split_once(config):
  per_host = [list(ip.eval_iterator(config, "test", batch_size=30, process_index=p,
                                    process_count=3)) for p in range(3)]
  orders = [[b["image"].shape[2] for b in batches] for batches in per_host]
  assert orders[0] == orders[1] == orders[2]  # batch k has one width on every host
  seen = []
  for p, batches in enumerate(per_host):
    lo, hi = ip.host_bounds(100, p, 3, drop_remainder=False)
    for b in batches:
      assert b["image"].shape[0] == 10
      _check_one_bucket(b)
      index = b["index"][b["mask"]]
      assert ((index >= lo) & (index < hi)).all()  # the host's own contiguous shard
      seen += index.tolist()
  assert sorted(seen) == list(range(100))


def test_eval_num_examples_reads_the_first_lines_of_the_split(config):
  batches = list(ip.eval_iterator(config, "test", process_index=0, process_count=1,
                                  num_examples=40))
  index = np.concatenate([b["index"][b["mask"]] for b in batches])
  assert sorted(index.tolist()) == list(range(40))


def test_train_batches_hold_one_bucket_and_use_them_all(config):
  batches = _take(ip.train_iterator(config, seed=0, process_index=0, process_count=1), 40)
  for b in batches:
    assert set(b) == {"image", "tokens", "length", "width"} and b["image"].shape[0] == 16
    _check_one_bucket(b)
    eos = np.argmax(b["tokens"] == 11, axis=1)
    np.testing.assert_array_equal(eos, b["length"] + 1)
  widths = [b["image"].shape[2] for b in batches]
  assert set(widths) == set(BUCKETS) and widths != sorted(widths)  # interleaved, not in runs
  # The stored lines, found again: each row is a train line, cropped to its width.
  stored = {_line_hash(ex["image"] / 255, ex["image"].shape[1]) for ex in _split(config, "train")}
  rows = [_line_hash(b["image"][r], b["width"][r]) for b in batches for r in range(16)]
  assert set(rows) <= stored


def test_each_bucket_sees_its_lines_once_an_epoch():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 4, 300)
  widths = np.minimum(8 * rng.integers(1, 7, 300), 48)
  lines = ip.host_lines(lengths, widths, BUCKETS, limit=3, process_index=0, process_count=1)
  assert len(lines.examples) == 300 and sorted(lines.examples) == list(range(300))
  plan = ip.TrainPlan(lines, batch_size=16, seed=3, process_index=0, max_digits=3)
  emitted = {j: [] for j in range(3)}
  for j, local in itertools.islice(plan.batches(), 3 * 300 // 16):
    assert (lines.bucket[local] == j).all()  # one bucket a batch
    emitted[j] += local.tolist()
  for j in range(3):
    mine = np.flatnonzero(lines.bucket == j).tolist()
    epoch0, epoch1 = emitted[j][:len(mine)], emitted[j][len(mine):2 * len(mine)]
    assert sorted(epoch0) == sorted(epoch1) == mine  # each line once an epoch, none dropped
    assert epoch0 != epoch1  # and a new order each epoch


@pytest.mark.parametrize("start_step", [7, 31])
def test_resume_with_buckets_curriculum_and_augmentation_is_exact(config, start_step):
  config = config.copy_and_resolve_references()
  config.data.curriculum_examples = 480  # 30 steps of 16 under the curriculum, then epochs
  config.data.curriculum_start_digits = 1
  for k in ("affine_prob", "elastic_prob", "noise_prob"):
    config.data.augment[k] = 0.5
  full = _take(ip.train_iterator(config, seed=4, process_index=0, process_count=1), 36)
  # Single digits for the first 160 lines (the first ~8 batches), then longer ones.
  assert max(int(b["length"].max()) for b in full[:4]) == 1
  assert max(int(b["length"].max()) for b in full[25:]) == 3
  assert len({b["image"].shape[2] for b in full}) == 3
  resumed = _take(ip.train_iterator(config, seed=4, start_step=start_step, process_index=0,
                                    process_count=1), 36 - start_step)
  for x, y in zip(full[start_step:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for b in full:
    _check_one_bucket(b)  # distorted at their own width: no ink in the padding


def test_hosts_take_the_same_bucket_at_every_step(config):
  per_host = [_take(ip.train_iterator(config, seed=2, process_index=p, process_count=2), 30)
              for p in range(2)]
  assert ([b["image"].shape[2] for b in per_host[0]]
          == [b["image"].shape[2] for b in per_host[1]])
  assert len({b["image"].shape[2] for b in per_host[0]}) == 3
  hashes = []
  for batches in per_host:
    for b in batches:
      assert b["image"].shape[0] == 8  # 16 / 2 hosts
      _check_one_bucket(b)
    hashes.append({_line_hash(b["image"][r], b["width"][r]) for b in batches for r in range(8)})
  assert not hashes[0] & hashes[1]  # disjoint shares


def test_buckets_too_narrow_for_the_longest_line_fail_before_building(tmp_path):
  config = config_lib.load("tiny")
  config.data.data_dir = str(tmp_path / "tfds")
  config.max_digits = 6
  config.width_buckets = BUCKETS
  with pytest.raises(ValueError, match=r"cannot hold the longest training line: 6 digits"):
    ip.train_iterator(config, seed=0, process_index=0, process_count=1)
  assert not list((tmp_path / "tfds").glob("**/dataset_info.json"))


def test_preview_sheet_fits_the_widest_line(config):
  from digit_vit.data import preview  # pylint: disable=import-outside-toplevel
  lines = _split(config, "test")[:6]
  widest = max(ex["image"].shape[1] for ex in lines)
  assert min(ex["image"].shape[1] for ex in lines) < widest
  sheet = preview.contact_sheet(lines, columns=3, scale=2, bboxes=True)
  assert sheet.size == (3 * (widest * 2 + 8), 2 * (16 * 2 + 22))
