"""Input pipeline for the digit reader: `multi_digit_mnist` -> numpy batches for the trainer.

  builder = get_dataset_builder(config)           # builds the dataset on first use
  it = train_iterator(config, seed=0, start_step=0)  # infinite, host-local batches
  for batch in eval_iterator(config, "validation"): ...  # finite, padded, with `mask`

Lines are stored at their natural width (`multi_digit_mnist`); a batch pads its lines on the right
with background (0) to one width bucket of `config.width_buckets` (ascending multiples of 8, the
widest = `config.image_width`; default: the one bucket `(config.image_width,)`), so `jit`
compiles one program per bucket. Each line goes to the narrowest bucket that holds it.

Batches are dicts of numpy arrays: `image` float32 [b, H, W_bucket, 1] in [0, 1] with ink 1
(bright) and background 0, zero beyond each line's `width` int32 [b] (its natural width in
pixels), `tokens` int32 [b, max_digits + 2], `length` int32 [b]; eval batches also carry `mask`
bool [b] (False on padding rows) and `index` int32 [b] (the line's place in the split, -1 on
padding rows). `b` is the host-local batch: the global `config.batch_size` (or
`config.eval_batch_size`) divided by the process count.

Where the data lives: `config.data.data_dir` when set, else `./data/tfds` relative to the working
directory (the repo root, where the README's commands run; `data/` is git-ignored).

Training order (`TrainPlan`, numpy, before tf.data): a stream of lines, each epoch a permutation
of the host's lines drawn from (seed, epoch), is grouped by bucket: a line joins its bucket's
open batch, and a batch goes out when it holds `b` lines (lines wait across epoch boundaries, none
is dropped). The k-th batch of `train_iterator(config, seed=s)` is a pure function of
(config, s, k, process), so `train_iterator(..., start_step=k)` resumes exactly (it replays the
plan's indices, not images). On several hosts, every host's batch k has the same bucket (the
trainer joins them into one global array): hosts hold equally many lines of every (length,
bucket) and share the order of the buckets, each with its own lines. Per-example augmentation
runs at the line's natural width (no ink reaches the padding) and draws from (seed, process,
step, row), so resuming reproduces it too; the last `config.data.augment.clean_final_steps`
steps see the lines undistorted. With `config.data.train_max_digits` set, training draws only
the lines of at most that many digits from the train split (for length generalisation);
evaluation always sees every length.

Evaluation: each host reads its contiguous shard of the split and yields, bucket by bucket
(narrowest first), batches of its lines of that bucket in split order; every host yields the
same buckets in the same order and as many batches (padded with masked rows), so collective
ops in the eval step stay in step. Every line of the split is in exactly one batch once.

The host's lines are read into memory once (train: PNG bytes, decoded in the tf.data map; eval:
decoded uint8 images) and cached for the life of the process.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import itertools
import math
import os
import threading
from collections.abc import Iterator

from PIL import Image

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from digit_vit.data import multi_digit_mnist
from digit_vit.data.buckets import bucket_index, width_buckets  # Also for callers of this module.

try:  # tf.data must never take an accelerator from JAX.
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):
  pass

SPLITS = ("train", "validation", "test")
DEFAULT_DATA_DIR = os.path.join("data", "tfds")


# ----------------------------------------------------------------------------------------------
# Builder


def builder_config_from(config) -> multi_digit_mnist.MultiDigitMnistConfig:
  """The dataset's BuilderConfig from the experiment config (validated, the width buckets too,
  before anything is built; errors say what to set).

  The composition's settings come from `config.data.<name>` where set, else
  `compose.Composition`'s defaults (`multi_digit_mnist.STYLE_PARAMS`).
  """
  d = config.data
  style = {k: float(d.get(k, getattr(multi_digit_mnist.MultiDigitMnistConfig, k)))
           for k in multi_digit_mnist.STYLE_PARAMS}
  bc = multi_digit_mnist.MultiDigitMnistConfig.create(
      source=str(d.source), source_dir=str(d.get("source_dir", "") or ""),
      max_digits=int(d.max_digits), height=int(d.image_height), width=int(d.image_width),
      train_size=int(d.train_size), validation_size=int(d.validation_size),
      test_size=int(d.test_size), validation_per_class=int(d.validation_per_class),
      seed=int(d.seed), **style)
  width_buckets(config)
  return bc


def data_dir_from(config, data_dir: str | None = None) -> str:
  """data_dir argument, else config.data.data_dir, else ./data/tfds (absolute path)."""
  data_dir = data_dir or config.data.get("data_dir", "") or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(str(data_dir)))


_BUILD_LOCK = threading.Lock()


def get_dataset_builder(config, data_dir: str | None = None) -> multi_digit_mnist.MultiDigitMnist:
  """The prepared `multi_digit_mnist` builder for `config.data` (built on first use).

  On several hosts, build it once beforehand (`python -m digit_vit.data.build`) into a shared
  data_dir, or let every host build its own local copy (generation is deterministic).
  """
  bc = builder_config_from(config)
  registered = multi_digit_mnist.MultiDigitMnist.builder_configs.get(bc.name)
  builder = multi_digit_mnist.MultiDigitMnist(
      config=registered or bc, data_dir=data_dir_from(config, data_dir))
  if builder.is_prepared():
    return builder
  # Threads of this process, and other processes on this machine (pytest-xdist workers, hosts
  # sharing a data_dir), take turns: the first builds, the others find it prepared.
  os.makedirs(builder.data_dir_root, exist_ok=True)
  lock_path = os.path.join(builder.data_dir_root, f".{builder.name}-{bc.name}.lock")
  with _BUILD_LOCK, open(lock_path, "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    builder = multi_digit_mnist.MultiDigitMnist(
        config=registered or bc, data_dir=data_dir_from(config, data_dir))
    if not builder.is_prepared():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def num_examples(config, split: str) -> int:
  """Number of examples of a split (all hosts together) that the iterators yield: for 'train'
  with `config.data.train_max_digits` set, the lines of at most that many digits."""
  _check_split(split)
  builder = get_dataset_builder(config)
  n = int(builder.info.splits[split].num_examples)
  limit = train_max_digits(config)
  if split != "train" or limit >= int(config.data.max_digits):
    return n
  lengths = _read_shard(builder, "train", 0, n, decode=False, fields=("length",))["length"]
  return int(np.sum(lengths <= limit))


def train_max_digits(config) -> int:
  """The longest training line: `config.data.train_max_digits`, or max_digits when it is 0."""
  max_digits = int(config.data.max_digits)
  limit = int(config.data.get("train_max_digits", 0) or 0)
  if not 0 <= limit <= max_digits:
    raise ValueError(f"config.data.train_max_digits={limit} must be in 0..max_digits="
                     f"{max_digits} (0 = train on every length)")
  return limit or max_digits


def _check_split(split):
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def host_bounds(n: int, process_index: int, process_count: int, *,
                drop_remainder: bool) -> tuple[int, int]:
  """[start, end) of this host's contiguous shard of n examples.

  drop_remainder=True (train): every host gets n // process_count examples.
  drop_remainder=False (eval): shards differ by at most one and cover all n.
  """
  if drop_remainder:
    per = n // process_count
    if per == 0:
      raise ValueError(f"{n} examples cannot be shared by {process_count} processes")
    return process_index * per, (process_index + 1) * per
  return n * process_index // process_count, n * (process_index + 1) // process_count


def host_batch_size(global_batch: int, process_count: int, what: str = "config.batch_size") -> int:
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"{what}={global_batch} must be a positive multiple of the process count "
                     f"{process_count}")
  return global_batch // process_count


# ----------------------------------------------------------------------------------------------
# Reading a host's shard into memory

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


_SHARD_FIELDS = ("image", "tokens", "length", "width")


def _read_shard(builder, split: str, start: int, end: int, *, decode: bool,
                fields: tuple[str, ...] = _SHARD_FIELDS) -> dict[str, np.ndarray]:
  """The `fields` of examples [start, end) of a split, as numpy arrays [end - start, ...]
  (cached). `image` is PNG bytes, or with `decode` an object array of uint8 [H, W_i, 1]."""
  key = (builder.data_path.as_posix() if hasattr(builder.data_path, "as_posix")
         else str(builder.data_path), split, start, end, decode, fields)
  with _CACHE_LOCK:
    if key in _CACHE:
      return _CACHE[key]
  # Images differ in width, so they are read as PNG bytes (which batch) and decoded here.
  decoders = {"image": tfds.decode.SkipDecoding()} if "image" in fields else None
  ds = builder.as_dataset(split=f"{split}[{start}:{end}]", shuffle_files=False,
                          decoders=decoders,
                          read_config=tfds.ReadConfig(interleave_cycle_length=1))
  ds = ds.map(graph_fn(lambda ex: {k: ex[k] for k in fields})).batch(4096)
  parts = list(tfds.as_numpy(ds))
  out = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros((0,)) for k in fields}
  if out[fields[0]].shape[0] != end - start:
    raise RuntimeError(f"read {out[fields[0]].shape[0]} examples of {split}[{start}:{end}]")
  if decode and "image" in out:
    images = np.empty(end - start, object)
    for i, png in enumerate(out["image"]):
      images[i] = np.asarray(Image.open(io.BytesIO(png)), np.uint8)[..., None]
    out["image"] = images
  for k in ("tokens", "length", "width"):
    if k in out:
      out[k] = out[k].astype(np.int32)
  with _CACHE_LOCK:
    _CACHE[key] = out
  return out


def line_sources(config, split: str) -> dict[str, np.ndarray]:
  """Where each line of `split` came from, all hosts' lines in split order (eval batches name each
  row's place in it: `index`): `digits` (str [n], the true reading), `length` int32 [n],
  `width` int32 [n] (the line's natural width in pixels), `source_ids` int64 [n, max_digits]
  (each digit's source id, `sources.py`; -1 past the line's end) and `bboxes` float32
  [n, max_digits, 4] (where each digit was drawn, `multi_digit_mnist`: x normalised by the
  line's own `width`)."""
  _check_split(split)
  builder = get_dataset_builder(config)
  n = builder.info.splits[split].num_examples
  out = dict(_read_shard(builder, split, 0, n, decode=False,
                         fields=("digits", "length", "width", "source_ids", "bboxes")))
  out["digits"] = np.array([d.decode() for d in out["digits"]])
  return out


# ----------------------------------------------------------------------------------------------
# Shared tf.data machinery (also used by classification.py)


def graph_fn(fn):
  """`fn`, for tf.data to trace as it is written, without autograph.

  tf.data runs autograph on a mapped function when it first traces it, and autograph reads the
  function's source back from the file on disk: if the file was edited after the process started
  (a researcher changing code while a run trains), it converts whatever now sits at the old line
  numbers, and the run dies at its first evaluation with errors such as `tf__load() missing 1
  required positional argument`. Every function this package hands to tf.data is written in
  graph style (tf.cond and tf.where on tensors, Python `if` only on Python values), so none needs
  converting.
  """
  return tf.autograph.experimental.do_not_convert(fn)


def seed_pair(*values: int) -> np.ndarray:
  """A stateless-RNG seed [2] int64 mixing any number of ints (stable across machines)."""
  ss = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values])
  return ss.generate_state(2, np.uint32).astype(np.int64)


def index_stream(n: int, seed: int, start: int, process_index: int) -> tf.data.Dataset:
  """Infinite (position, index) pairs from position `start`: epoch e is a permutation of range(n)
  drawn from (seed, process, e); `position` is the example's place in the whole stream."""
  start_epoch, offset = divmod(start, n)
  base = seed_pair(seed, process_index, 0x5EED)

  def epoch(e):
    s = tf.stack([tf.constant(base[0]), tf.constant(base[1]) + e])
    keys = tf.random.stateless_uniform([n], seed=s, dtype=tf.float32)
    return tf.data.Dataset.from_tensor_slices(tf.argsort(keys, stable=True))

  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(graph_fn(epoch)).skip(offset)
  return tf.data.Dataset.zip(tf.data.Dataset.range(start, 2**62), ds)


def data_options(config) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  threads = int(config.data.get("threads", 0) or 0)
  if threads:
    options.threading.private_threadpool_size = threads
  return options


def parallel_calls(config) -> int:
  v = int(config.data.get("num_parallel_calls", -1))
  return tf.data.AUTOTUNE if v <= 0 else v


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a partial batch to `size` rows (copies of row 0, or zeros) and adds `mask`."""
  n = next(iter(batch.values())).shape[0]
  out = {}
  for k, v in batch.items():
    pad = np.zeros((size - n,) + v.shape[1:], v.dtype)
    out[k] = np.concatenate([v, pad]) if n < size else v
  out["mask"] = np.arange(size) < n
  return out


# ----------------------------------------------------------------------------------------------
# Augmentation (train only; tf ops on one float32 [H, W, 1] image in [0, 1])


# Ink brighter than this counts as ink where `augment_audit` weighs what a map cuts off (about
# the composer's 24/255).
INK_THRESHOLD = 0.1


def _size(image):
  """(h, w) of an image [H, W, C] as float32 scalars (its width may be known at run time only)."""
  shape = tf.shape(image)
  return tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)


def affine_transform(image, seed, a):
  """The [8] output -> input transform of a random rotation, scale, shear and shift about the
  image's centre, for ImageProjectiveTransformV3 (`a`: config.data.augment). The image [H, W, 1]
  may be of any width (a line at its natural width): shifts are fractions of its own size.
  """
  h, w = _size(image)
  u = tf.random.stateless_uniform([6], seed=seed, minval=-1.0, maxval=1.0)
  theta = u[0] * (a.max_rotation * math.pi / 180.0)
  scale = 1.0 + u[1] * a.max_scale_change
  shear = u[2] * a.max_shear
  tx, ty = u[3] * a.max_translate * w, u[4] * a.max_translate * h
  cos, sin = tf.cos(theta), tf.sin(theta)
  # Output -> input map (what ImageProjectiveTransform wants) about the centre:
  # in = A (out - c - t) + c, so out = A^-1 (in - c) + c + t.
  a0, a1 = cos / scale, (sin + shear) / scale
  b0, b1 = -sin / scale, cos / scale
  cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
  a2 = cx - a0 * (cx + tx) - a1 * (cy + ty)
  b2 = cy - b0 * (cx + tx) - b1 * (cy + ty)
  return tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])


def apply_transform(image, transform):
  """image [H, W, C] resampled (bilinear, zeros outside) by an [8] output -> input transform."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
  return tf.ensure_shape(out[0], image.shape)


def _affine(image, seed, a):
  return apply_transform(image, affine_transform(image, seed, a))


def _bilinear_sample(image, ys, xs):
  h, w = _size(image)
  img = image[..., 0]
  y0, x0 = tf.floor(ys), tf.floor(xs)
  wy, wx = ys - y0, xs - x0
  hi, wi = tf.shape(image)[0], tf.shape(image)[1]

  def at(yy, xx):
    inside = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
    yi = tf.clip_by_value(tf.cast(yy, tf.int32), 0, hi - 1)
    xi = tf.clip_by_value(tf.cast(xx, tf.int32), 0, wi - 1)
    return tf.where(inside, tf.gather_nd(img, tf.stack([yi, xi], -1)), 0.0)

  out = ((1 - wy) * (1 - wx) * at(y0, x0) + (1 - wy) * wx * at(y0, x0 + 1)
         + wy * (1 - wx) * at(y0 + 1, x0) + wy * wx * at(y0 + 1, x0 + 1))
  return tf.ensure_shape(out[..., None], image.shape)


def _elastic(image, seed, a):
  h, w = _size(image)
  hi, wi = tf.shape(image)[0], tf.shape(image)[1]
  gh = tf.maximum(2, tf.cast(tf.round(h / a.elastic_grid), tf.int32))
  gw = tf.maximum(2, tf.cast(tf.round(w / a.elastic_grid), tf.int32))
  coarse = tf.random.stateless_normal(tf.stack([gh, gw, 2]), seed=seed) * a.elastic_alpha
  field = tf.image.resize(coarse, tf.stack([hi, wi]), method="bicubic")
  yy, xx = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
  return _bilinear_sample(image, yy + field[..., 0], xx + field[..., 1])


def clean_from_position(config, host_batch: int) -> int | None:
  """The host's training slot (step * host_batch + row) from which training images pass undistorted: the first example
  of step num_train_steps - config.data.augment.clean_final_steps; None when that is 0."""
  clean = int(config.data.get("augment", {}).get("clean_final_steps", 0) or 0)
  total = int(config.num_train_steps)
  if not 0 <= clean <= total:
    raise ValueError(f"config.data.augment.clean_final_steps={clean} must be in 0..num_train_steps"
                     f"={total} (0 = distort until the end)")
  return (total - clean) * host_batch if clean else None


def augment_fn(config, host_batch: int):
  """(image, seed [2], position) -> image, applying config.data.augment.*; None when all is off.

  `image` is float32 [H, W, 1] in [0, 1], W any width (the reader's lines are distorted at their
  natural width, before padding, so no ink reaches the padding). `position` is the example's
  slot in the host's training batches (step * `host_batch` + row): from `clean_from_position`
  on the image is returned as it is.
  """
  a = config.data.get("augment")
  if a is None:
    return None
  clean_from = clean_from_position(config, host_batch)
  probs = [a.get(k, 0.0) for k in ("affine_prob", "elastic_prob", "noise_prob", "contrast_prob",
                                   "invert_prob")]
  if not any(p > 0 for p in probs):
    return None

  def distort(image, seed):
    seeds = tf.random.experimental.stateless_split(seed, 6)
    coins = tf.random.stateless_uniform([5], seed=seeds[0])
    if a.affine_prob > 0:
      image = tf.cond(coins[0] < a.affine_prob, lambda: _affine(image, seeds[1], a),
                      lambda: image)
    if a.elastic_prob > 0:
      image = tf.cond(coins[1] < a.elastic_prob, lambda: _elastic(image, seeds[2], a),
                      lambda: image)
    if a.contrast_prob > 0:
      u = tf.random.stateless_uniform([2], seed=seeds[3])
      c = a.min_contrast + (1.0 - a.min_contrast) * u[0]
      bg = u[1] * (1.0 - c) * 0.5
      image = tf.where(coins[2] < a.contrast_prob, bg + c * image, image)
    if a.noise_prob > 0:
      noise = tf.random.stateless_normal(tf.shape(image), seed=seeds[4]) * a.noise_std
      image = tf.where(coins[3] < a.noise_prob, image + noise, image)
    if a.invert_prob > 0:  # Dark ink on bright paper: breaks "ink = 1" on purpose.
      image = tf.where(coins[4] < a.invert_prob, 1.0 - image, image)
    return tf.clip_by_value(image, 0.0, 1.0)

  if clean_from is None:
    return lambda image, seed, position: distort(image, seed)
  return lambda image, seed, position: tf.cond(
      position < clean_from, lambda: distort(image, seed), lambda: image)


# ----------------------------------------------------------------------------------------------
# The training plan: which lines make up each batch (numpy, before tf.data)


@dataclasses.dataclass(frozen=True)
class HostLines:
  """A host's training lines in blocks of one (length, bucket) "cell", blocks in order of length
  then bucket. Every host's blocks have the same sizes (each host takes an equal share of every
  cell; the few left over are used by none), so the cell of a slot is the same on every host
  and only the line in it differs: a plan drawn over slots gives every host the same buckets.

  Attributes:
    examples: int64 [N] indices into the split, block by block, each block in split order.
    block: int64 [N] the block of each slot, 0, 1, ... (non-decreasing).
    bucket: int64 [N] the width bucket (index) of each slot's line.
    length: int64 [N] the length of each slot's line (non-decreasing).
  """
  examples: np.ndarray
  block: np.ndarray
  bucket: np.ndarray
  length: np.ndarray


def host_lines(lengths: np.ndarray, widths: np.ndarray, buckets: tuple[int, ...], *, limit: int,
               process_index: int, process_count: int) -> HostLines:
  """This host's share of the training lines of at most `limit` digits.

  Args:
    lengths, widths: int [n], every line of the split (all hosts read the same).
    buckets: the width buckets.
    limit: the longest line trained on (`train_max_digits`).
    process_index, process_count: the host and number of hosts.
  """
  lengths = np.asarray(lengths, np.int64)
  bucket = bucket_index(widths, buckets)
  keep = np.flatnonzero(lengths <= limit)
  if not keep.size:
    raise ValueError(f"the train split has no lines of at most {limit} digits "
                     "(config.data.train_max_digits)")
  cell = lengths[keep] * len(buckets) + bucket[keep]
  order = np.argsort(cell, kind="stable")
  lines, cell = keep[order], cell[order]
  cells, starts, counts = np.unique(cell, return_index=True, return_counts=True)
  share = counts // process_count
  if not share.sum():
    raise ValueError(f"{keep.size} training lines cannot be shared by {process_count} processes")
  examples = np.concatenate([lines[s + process_index * m:s + (process_index + 1) * m]
                             for s, m in zip(starts, share)])
  slot_cell = np.repeat(cells, share)
  return HostLines(examples=examples, block=np.repeat(np.arange(len(cells)), share),
                   bucket=slot_cell % len(buckets), length=slot_cell // len(buckets))


class TrainPlan:
  """The host's training batches as indices into its `HostLines`, grouped by width bucket.

  A stream of slots is drawn first: the length curriculum's `curriculum_examples` (at stream
  position p, a uniform draw among the lines of at most L(p) digits, L growing linearly from
  `curriculum_start_digits` to `max_digits`: short lines first, where the decoder learns to find
  and read one digit, then longer ones), then epochs, each a permutation of all the lines. The
  stream is grouped by bucket: each line joins its bucket's open batch, and a batch goes out
  when it is full (so a batch's lines are near each other in the stream, and waiting lines
  cross epoch boundaries rather than being dropped). Which *slots* the stream draws depends on
  (seed, position) only, and a slot's bucket is the same on every host, so every host's k-th
  batch has the same bucket; which line fills a slot of a block is shuffled per host and epoch.

  All of it is a pure function of the arguments: `batches(start_step=k)` replays the plan's
  indices from position 0 (integers only: resuming at step 10,500 of 64 lines took 0.6 s on a
  busy 2-core machine) and yields from batch k.
  """

  CHUNK = 1 << 16  # Curriculum positions drawn at a time (their own seed each).

  def __init__(self, lines: HostLines, *, batch_size: int, seed: int, process_index: int,
               max_digits: int, curriculum_examples: int = 0, curriculum_start_digits: int = 1):
    if curriculum_examples and not 1 <= curriculum_start_digits <= max_digits:
      raise ValueError(f"config.data.curriculum_start_digits={curriculum_start_digits} must be "
                       f"in 1..max_digits={max_digits}")
    if curriculum_examples < 0:
      raise ValueError(f"config.data.curriculum_examples={curriculum_examples} must be >= 0")
    self.lines, self.b, self.seed = lines, int(batch_size), int(seed)
    self.process_index = int(process_index)
    self.max_digits, self.total = int(max_digits), int(curriculum_examples)
    self.start_digits = int(curriculum_start_digits)
    # Slots [0, ends[L]) hold the lines of at most L digits (blocks are sorted by length).
    self._ends = np.searchsorted(lines.length, np.arange(self.max_digits + 1), side="right")
    if self.total and not self._ends[self.start_digits]:
      raise ValueError(f"the curriculum starts with lines of at most {self.start_digits} digits "
                       "but the train split has none; raise config.data.curriculum_start_digits")

  def _stream(self):
    """Yields (slots int64 [m], stream positions int64 [m]) chunk by chunk from position 0."""
    lines, total = self.lines, self.total
    n = len(lines.examples)
    for chunk, c0 in enumerate(range(0, total, self.CHUNK)):
      pos = np.arange(c0, min(c0 + self.CHUNK, total), dtype=np.int64)
      limit = self.start_digits + (self.max_digits - self.start_digits + 1) * pos // total
      ends = self._ends[np.minimum(limit, self.max_digits)]  # > 0: limit >= start_digits
      u = np.random.default_rng(seed_pair(self.seed, chunk, 0xC0C0)).random(pos.size)
      yield np.minimum((u * ends).astype(np.int64), ends - 1), pos
    for epoch in itertools.count():
      order = np.random.default_rng(seed_pair(self.seed, epoch, 0x5EED)).permutation(n)
      # This host's lines within each block, shuffled: the slot keeps its block, so its bucket.
      keys = np.random.default_rng(seed_pair(self.seed, self.process_index, epoch,
                                             0xB10C)).random(n)
      within = np.lexsort((keys, lines.block))
      yield within[order], total + epoch * n + np.arange(n, dtype=np.int64)

  def batches(self, start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (bucket index, int64 [b] indices into the HostLines) per step from `start_step`."""
    waiting = [(np.zeros(0, np.int64), np.zeros(0, np.int64))
               for _ in range(int(self.lines.bucket.max()) + 1)]
    step, b = 0, self.b
    for slots, pos in self._stream():
      slot_bucket = self.lines.bucket[slots]
      done = []
      for j in np.unique(slot_bucket):
        mine = slot_bucket == j
        s = np.concatenate([waiting[j][0], slots[mine]])
        p = np.concatenate([waiting[j][1], pos[mine]])
        full = len(s) // b
        # A batch goes out at the stream position of its last line.
        done += [(p[(m + 1) * b - 1], int(j), s[m * b:(m + 1) * b]) for m in range(full)]
        waiting[j] = (s[full * b:], p[full * b:])
      done.sort(key=lambda t: t[0])
      for _, j, s in done:
        if step >= start_step:
          yield j, s
        step += 1


# ----------------------------------------------------------------------------------------------
# Iterators


def train_dataset(config, *, seed: int, start_step: int = 0, process_index=None,
                  process_count=None) -> tf.data.Dataset:
  """The infinite tf.data pipeline behind `train_iterator`."""
  process_index, process_count = _process(process_index, process_count)
  b = host_batch_size(int(config.batch_size), process_count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  builder = get_dataset_builder(config)
  buckets = width_buckets(config)
  n_all = builder.info.splits["train"].num_examples
  split = _read_shard(builder, "train", 0, n_all, decode=False)
  limit = train_max_digits(config)
  lines = host_lines(split["length"], split["width"], buckets, limit=limit,
                     process_index=process_index, process_count=process_count)
  plan = TrainPlan(lines, batch_size=b, seed=seed, process_index=process_index, max_digits=limit,
                   curriculum_examples=int(config.data.get("curriculum_examples", 0) or 0),
                   curriculum_start_digits=int(config.data.get("curriculum_start_digits", 1)))
  pngs = tf.constant(split["image"][lines.examples])
  toks = tf.constant(split["tokens"][lines.examples])
  lens = tf.constant(split["length"][lines.examples])
  height = int(config.data.image_height)
  aug = augment_fn(config, b)
  aug_base = seed_pair(seed, process_index, 0xA06)
  bucket_widths = np.asarray(buckets, np.int32)

  def plan_batches():
    rows = np.arange(b, dtype=np.int64)
    for step, (j, local) in enumerate(plan.batches(start_step), start_step):
      yield local.astype(np.int32), np.full(b, bucket_widths[j], np.int32), step * b + rows

  def load(idx, bucket_width, slot):
    image = tf.io.decode_png(tf.gather(pngs, idx), channels=1)
    image = tf.ensure_shape(image, [height, None, 1])
    width = tf.shape(image)[1]
    if aug is not None:  # At the line's own width: nothing moves into the padding.
      image = tf.cast(image, tf.float32) / 255.0
      image = aug(image, tf.stack([tf.constant(aug_base[0]), tf.constant(aug_base[1]) + slot]),
                  slot)
    image = tf.pad(image, [[0, 0], [0, bucket_width - width], [0, 0]])
    return {"image": image, "tokens": tf.gather(toks, idx), "length": tf.gather(lens, idx),
            "width": width}

  def finish(batch):
    image = batch["image"]
    if image.dtype == tf.uint8:
      image = tf.cast(image, tf.float32) * (1.0 / 255.0)
    return {"image": image, "tokens": batch["tokens"], "length": batch["length"],
            "width": batch["width"]}

  # One element per batch of the plan, unbatched so that the lines load in parallel, and batched
  # again in the same order: batch boundaries stay the plan's, so a batch holds one bucket.
  ds = tf.data.Dataset.from_generator(plan_batches, output_signature=(
      tf.TensorSpec([b], tf.int32), tf.TensorSpec([b], tf.int32), tf.TensorSpec([b], tf.int64)))
  ds = ds.unbatch().map(graph_fn(load), num_parallel_calls=parallel_calls(config))
  ds = ds.batch(b, drop_remainder=True).map(graph_fn(finish))
  ds = ds.prefetch(int(config.data.get("prefetch", 2)))
  return ds.with_options(data_options(config))


def train_iterator(config, *, seed: int, start_step: int = 0, process_index=None,
                   process_count=None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local training batches, deterministic for (config, seed); see module doc.

  Args:
    config: the experiment config (`config.data`, `config.batch_size`, `config.width_buckets`).
    seed: the input-order and augmentation seed.
    start_step: yield from this batch on, exactly as an uninterrupted iterator would.
    process_index, process_count: the host and number of hosts (default: from jax).

  Yields:
    {'image': float32 [b, H, W_bucket, 1], 'tokens': int32 [b, max_digits + 2],
     'length': int32 [b], 'width': int32 [b]}, one bucket a batch.
  """
  ds = train_dataset(config, seed=seed, start_step=start_step, process_index=process_index,
                     process_count=process_count)
  return iter(tfds.as_numpy(ds))


def eval_iterator(config, split: str, *, batch_size: int | None = None, process_index=None,
                  process_count=None,
                  num_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Finite host-local batches covering this host's shard of `split` exactly once, by bucket.

  The host's shard is a contiguous part of the split (of its first `num_examples` lines when
  given). Batches go bucket by bucket, narrowest first, each bucket's lines in split order;
  every batch has the full batch size and `mask` is False on padding rows. Every host yields
  the same buckets in the same order, as many batches of each (hosts with fewer lines of a
  bucket get masked rows, or whole masked batches), so collective ops in the eval step stay in
  step. With one bucket, the batches are in split order.

  Args:
    config: the experiment config.
    split: 'train', 'validation' or 'test'.
    batch_size: global batch; default config.eval_batch_size, else config.batch_size.
    process_index, process_count: the host and number of hosts (default: from jax).
    num_examples: read only the split's first this many lines (None or <= 0: all of them).

  Yields:
    {'image': float32 [b, H, W_bucket, 1], 'tokens': int32 [b, max_digits + 2],
     'length': int32 [b], 'width': int32 [b], 'index': int32 [b] (the line's place in the
     split; -1 on padding rows), 'mask': bool [b]}.
  """
  _check_split(split)
  process_index, process_count = _process(process_index, process_count)
  if batch_size is None:
    batch_size = config.get("eval_batch_size") or config.batch_size
  b = host_batch_size(int(batch_size), process_count, "eval batch size")
  buckets = width_buckets(config)
  builder = get_dataset_builder(config)
  n_all = builder.info.splits[split].num_examples
  n = n_all if num_examples is None or num_examples <= 0 else min(int(num_examples), n_all)
  widths = _read_shard(builder, split, 0, n_all, decode=False, fields=("width",))["width"][:n]
  bucket = bucket_index(widths, buckets)
  # Batches of each bucket: as many as the host with the most lines of that bucket needs.
  bounds = [host_bounds(n, p, process_count, drop_remainder=False) for p in range(process_count)]
  counts = np.stack([np.bincount(bucket[lo:hi], minlength=len(buckets)) for lo, hi in bounds])
  num_batches = -(-counts.max(axis=0) // b)
  lo, hi = bounds[process_index]
  shard = _read_shard(builder, split, lo, hi, decode=True, fields=("image", "tokens", "length"))
  return _eval_batches(shard, lo, bucket[lo:hi], buckets, num_batches, b,
                       int(config.data.image_height))


def _eval_batches(shard, lo, bucket, buckets, num_batches, b, height):
  for j, width in enumerate(buckets):
    rows = np.flatnonzero(bucket == j)
    for k in range(num_batches[j]):
      take = rows[k * b:(k + 1) * b]
      image = np.zeros((b, height, width, 1), np.float32)
      widths = np.zeros(b, np.int32)
      for r, i in enumerate(take):
        line = shard["image"][i]
        widths[r] = line.shape[1]
        image[r, :, :line.shape[1]] = line * np.float32(1 / 255)
      index = np.full(b, -1, np.int32)
      index[:len(take)] = lo + take
      batch = pad_batch({"tokens": shard["tokens"][take], "length": shard["length"][take]}, b)
      yield {"image": image, **batch, "width": widths, "index": index}
