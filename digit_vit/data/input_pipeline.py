"""Input pipeline for the digit reader: `multi_digit_mnist` -> numpy batches for the trainer.

  builder = get_dataset_builder(config)           # builds the dataset on first use
  it = train_iterator(config, seed=0, start_step=0)  # infinite, host-local batches
  for batch in eval_iterator(config, "validation"): ...  # finite, padded, with `mask`

Batches are dicts of numpy arrays: `image` float32 [b, H, W, 1] in [0, 1] with ink 1 (bright)
and background 0, `tokens` int32 [b, max_digits + 2], `length` int32 [b]; eval batches also carry
`mask` bool [b] (False on padding rows). `b` is the host-local batch: the global
`config.batch_size` (or `config.eval_batch_size`) divided by the process count.

Where the data lives: `config.data.data_dir` when set, else `./data/tfds` relative to the working
directory (the repo root, where the README's commands run; `data/` is git-ignored).

Training order: each epoch is a permutation of the host's shard drawn from (seed, epoch) with
stateless random ops, and batches run across epoch boundaries. The k-th batch of
`train_iterator(config, seed=s)` is a pure function of (config, s, k, process), so
`train_iterator(..., start_step=k)` resumes exactly (it skips indices, not images). Per-example
augmentation draws from (seed, process, position in the stream) and is reproduced on resume too;
the last `config.data.augment.clean_final_steps` steps see the lines undistorted.
With `config.data.train_max_digits` set, training draws only the lines of at most that many
digits from the train split (for length generalisation); evaluation always sees every length.

The host's shard of each split is read into memory once (train: PNG bytes, decoded in the
tf.data map; eval: decoded uint8 images) and cached for the life of the process.
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from digit_vit.data import multi_digit_mnist

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
  """The dataset's BuilderConfig from the experiment config (validated; errors say what to set)."""
  d = config.data
  return multi_digit_mnist.MultiDigitMnistConfig.create(
      source=str(d.source), source_dir=str(d.get("source_dir", "") or ""),
      max_digits=int(d.max_digits), height=int(d.image_height), width=int(d.image_width),
      train_size=int(d.train_size), validation_size=int(d.validation_size),
      test_size=int(d.test_size), validation_per_class=int(d.validation_per_class),
      seed=int(d.seed), min_scale=float(d.min_scale), max_scale=float(d.max_scale),
      scale_jitter=float(d.scale_jitter), min_gap=float(d.min_gap), max_gap=float(d.max_gap),
      vertical_jitter=float(d.vertical_jitter), max_rotation=float(d.max_rotation),
      thicken_prob=float(d.thicken_prob), thin_prob=float(d.thin_prob))


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
  lengths = _read_shard(builder, "train", 0, n, decode=False)["length"]
  return int(np.sum(lengths <= limit))


def train_max_digits(config) -> int:
  """The longest training line: `config.data.train_max_digits`, or max_digits when it is 0."""
  max_digits = int(config.data.max_digits)
  limit = int(config.data.get("train_max_digits", 0) or 0)
  if not 0 <= limit <= max_digits:
    raise ValueError(f"config.data.train_max_digits={limit} must be in 0..max_digits="
                     f"{max_digits} (0 = train on every length)")
  return limit or max_digits


def _restrict_lengths(shard: dict[str, np.ndarray], limit: int) -> dict[str, np.ndarray]:
  """The examples of a shard with at most `limit` digits (the shard itself if that is all)."""
  keep = np.flatnonzero(shard["length"] <= limit)
  if keep.size == shard["length"].size:
    return shard
  if not keep.size:
    raise ValueError(f"the train split has no lines of at most {limit} digits "
                     "(config.data.train_max_digits)")
  return {k: v[keep] for k, v in shard.items()}


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


_SHARD_FIELDS = ("image", "tokens", "length")


def _read_shard(builder, split: str, start: int, end: int, *, decode: bool,
                fields: tuple[str, ...] = _SHARD_FIELDS) -> dict[str, np.ndarray]:
  key = (builder.data_path.as_posix() if hasattr(builder.data_path, "as_posix")
         else str(builder.data_path), split, start, end, decode, fields)
  with _CACHE_LOCK:
    if key in _CACHE:
      return _CACHE[key]
  decoders = None if decode or "image" not in fields else {"image": tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=f"{split}[{start}:{end}]", shuffle_files=False,
                          decoders=decoders,
                          read_config=tfds.ReadConfig(interleave_cycle_length=1))
  ds = ds.map(graph_fn(lambda ex: {k: ex[k] for k in fields})).batch(4096)
  parts = list(tfds.as_numpy(ds))
  out = {k: np.concatenate([p[k] for p in parts]) for k in fields}
  if out["length"].shape[0] != end - start:
    raise RuntimeError(f"read {out['length'].shape[0]} examples of {split}[{start}:{end}]")
  for k in ("tokens", "length"):
    if k in out:
      out[k] = out[k].astype(np.int32)
  with _CACHE_LOCK:
    _CACHE[key] = out
  return out


def line_sources(config, split: str) -> dict[str, np.ndarray]:
  """Where each line of `split` came from, all hosts' lines in the order `eval_iterator` reads
  them: `digits` (str [n], the true reading), `length` int32 [n], `source_ids` int64
  [n, max_digits] (each digit's source id, `sources.py`; -1 past the line's end) and `bboxes`
  float32 [n, max_digits, 4] (where each digit was drawn, `multi_digit_mnist`)."""
  _check_split(split)
  builder = get_dataset_builder(config)
  n = builder.info.splits[split].num_examples
  out = dict(_read_shard(builder, split, 0, n, decode=False,
                         fields=("digits", "length", "source_ids", "bboxes")))
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


def curriculum_indices(lengths: np.ndarray, *, num_examples: int, start_digits: int,
                       max_digits: int, seed: int, process_index: int) -> np.ndarray:
  """The examples of the first `num_examples` stream positions under a length curriculum.

  At position p lines of at most L(p) digits are drawn (uniformly, with replacement), where
  L grows linearly from `start_digits` to `max_digits` over the curriculum: short lines first,
  where the decoder learns to find and read one digit, then longer ones. A pure function of
  its arguments, so a resumed run draws the same examples.

  Returns:
    int32 [num_examples] indices into `lengths`.
  """
  if not 1 <= start_digits <= max_digits:
    raise ValueError(f"config.data.curriculum_start_digits={start_digits} must be in "
                     f"1..max_digits={max_digits}")
  rng = np.random.default_rng(seed_pair(seed, process_index, 0xC0C0))
  position = np.arange(num_examples)
  limit = start_digits + (max_digits - start_digits + 1) * position // max(num_examples, 1)
  limit = np.minimum(limit, max_digits)
  out = np.empty(num_examples, np.int32)
  for digits in range(start_digits, max_digits + 1):
    where = np.flatnonzero(limit == digits)
    pool = np.flatnonzero(lengths <= digits)
    if where.size and not pool.size:
      raise ValueError(f"the curriculum needs lines of at most {digits} digits but the train "
                       "split has none; lower config.data.curriculum_start_digits")
    out[where] = pool[rng.integers(0, max(pool.size, 1), where.size)]
  return out


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


# Ink brighter than this counts as ink where `keep_inside` finds the ink's box (about the
# composer's 24/255) and where `augment_audit` weighs what a map cuts off.
INK_THRESHOLD = 0.1


def _ink_box(image):
  """(xmin, ymin, xmax, ymax) float32 pixel centres of the ink in [H, W, 1]; the canvas's centre
  point when there is none."""
  h, w = image.shape[0], image.shape[1]
  ink = image[..., 0] > INK_THRESHOLD
  rows, cols = tf.reduce_any(ink, axis=1), tf.reduce_any(ink, axis=0)

  def extent(any_ink, n):
    idx = tf.range(n, dtype=tf.float32)
    lo = tf.reduce_min(tf.where(any_ink, idx, float(n)))
    hi = tf.reduce_max(tf.where(any_ink, idx, -1.0))
    empty = hi < lo
    mid = (n - 1) / 2.0
    return tf.where(empty, mid, lo), tf.where(empty, mid, hi)

  xmin, xmax = extent(cols, w)
  ymin, ymax = extent(rows, h)
  return xmin, ymin, xmax, ymax


def affine_transform(image, seed, a):
  """The [8] output -> input transform of a random rotation, scale, shear and shift about the
  canvas's centre, for ImageProjectiveTransformV3 (`a`: config.data.augment).

  With `a.keep_inside`, the map is then moved (and, if the ink would still not fit, first shrunk
  about the canvas's centre) so that the ink's box stays on the canvas: on a 192-pixel line a
  5-degree turn moves the ends 8 pixels up or down and a 5% shift moves them 10 pixels sideways,
  which cut off part of an end digit that the line's label still names.
  """
  h, w = image.shape[0], image.shape[1]
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
  if a.get("keep_inside", False):
    det = a0 * b1 - a1 * b0
    i0, i1, j0, j1 = b1 / det, -a1 / det, -b0 / det, a0 / det  # A^-1
    xmin, ymin, xmax, ymax = _ink_box(image)
    px = tf.stack([xmin, xmax, xmin, xmax]) - cx
    py = tf.stack([ymin, ymin, ymax, ymax]) - cy
    ox, oy = i0 * px + i1 * py, j0 * px + j1 * py  # The box's corners, mapped, about c.
    span_x = tf.reduce_max(ox) - tf.reduce_min(ox)
    span_y = tf.reduce_max(oy) - tf.reduce_min(oy)
    fit = tf.minimum(1.0, tf.minimum((w - 1) / tf.maximum(span_x, 1e-6),
                                     (h - 1) / tf.maximum(span_y, 1e-6)))
    # Shrinking the output by `fit` is A -> A / fit; the corners shrink about c.
    a0, a1, b0, b1 = a0 / fit, a1 / fit, b0 / fit, b1 / fit
    ox, oy = ox * fit + cx + tx, oy * fit + cy + ty
    tx += tf.maximum(0.0, -tf.reduce_min(ox)) - tf.maximum(0.0, tf.reduce_max(ox) - (w - 1))
    ty += tf.maximum(0.0, -tf.reduce_min(oy)) - tf.maximum(0.0, tf.reduce_max(oy) - (h - 1))
  a2 = cx - a0 * (cx + tx) - a1 * (cy + ty)
  b2 = cy - b0 * (cx + tx) - b1 * (cy + ty)
  return tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])


def apply_transform(image, transform):
  """image [H, W, C] resampled (bilinear, zeros outside) by an [8] output -> input transform."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
  return tf.reshape(out, image.shape)


def _affine(image, seed, a):
  return apply_transform(image, affine_transform(image, seed, a))


def _bilinear_sample(image, ys, xs):
  h, w = image.shape[0], image.shape[1]
  img = image[..., 0]
  y0, x0 = tf.floor(ys), tf.floor(xs)
  wy, wx = ys - y0, xs - x0

  def at(yy, xx):
    inside = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
    yi = tf.clip_by_value(tf.cast(yy, tf.int32), 0, h - 1)
    xi = tf.clip_by_value(tf.cast(xx, tf.int32), 0, w - 1)
    return tf.where(inside, tf.gather_nd(img, tf.stack([yi, xi], -1)), 0.0)

  out = ((1 - wy) * (1 - wx) * at(y0, x0) + (1 - wy) * wx * at(y0, x0 + 1)
         + wy * (1 - wx) * at(y0 + 1, x0) + wy * wx * at(y0 + 1, x0 + 1))
  return out[..., None]


def _elastic(image, seed, a):
  h, w = image.shape[0], image.shape[1]
  gh, gw = max(2, round(h / a.elastic_grid)), max(2, round(w / a.elastic_grid))
  coarse = tf.random.stateless_normal([gh, gw, 2], seed=seed) * a.elastic_alpha
  field = tf.image.resize(coarse, [h, w], method="bicubic")
  yy, xx = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32),
                       indexing="ij")
  return _bilinear_sample(image, yy + field[..., 0], xx + field[..., 1])


def clean_from_position(config, host_batch: int) -> int | None:
  """The host's stream position from which training images pass undistorted: the first example
  of step num_train_steps - config.data.augment.clean_final_steps; None when that is 0."""
  clean = int(config.data.get("augment", {}).get("clean_final_steps", 0) or 0)
  total = int(config.num_train_steps)
  if not 0 <= clean <= total:
    raise ValueError(f"config.data.augment.clean_final_steps={clean} must be in 0..num_train_steps"
                     f"={total} (0 = distort until the end)")
  return (total - clean) * host_batch if clean else None


def augment_fn(config, host_batch: int):
  """(image, seed [2], position) -> image, applying config.data.augment.*; None when all is off.

  `position` is the example's place in the host's training stream (batches of `host_batch`):
  from `clean_from_position` on the image is returned as it is.
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
# Iterators


def train_dataset(config, *, seed: int, start_step: int = 0, process_index=None,
                  process_count=None) -> tf.data.Dataset:
  """The infinite tf.data pipeline behind `train_iterator`."""
  process_index, process_count = _process(process_index, process_count)
  b = host_batch_size(int(config.batch_size), process_count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  builder = get_dataset_builder(config)
  n_all = builder.info.splits["train"].num_examples
  lo, hi = host_bounds(n_all, process_index, process_count, drop_remainder=True)
  shard = _restrict_lengths(_read_shard(builder, "train", lo, hi, decode=False),
                            train_max_digits(config))
  pngs = tf.constant(shard["image"])
  toks = tf.constant(shard["tokens"])
  lens = tf.constant(shard["length"])
  height, width = int(config.data.image_height), int(config.data.image_width)
  aug = augment_fn(config, b)
  aug_base = seed_pair(seed, process_index, 0xA06)

  def load(pos, idx):
    image = tf.io.decode_png(tf.gather(pngs, idx), channels=1)
    image = tf.ensure_shape(image, [height, width, 1])
    if aug is not None:
      image = tf.cast(image, tf.float32) / 255.0
      image = aug(image, tf.stack([tf.constant(aug_base[0]), tf.constant(aug_base[1]) + pos]),
                  pos)
    return {"image": image, "tokens": tf.gather(toks, idx), "length": tf.gather(lens, idx)}

  def finish(batch):
    image = batch["image"]
    if image.dtype == tf.uint8:
      image = tf.cast(image, tf.float32) * (1.0 / 255.0)
    return {"image": image, "tokens": batch["tokens"], "length": batch["length"]}

  ds = _train_positions(config, shard["length"], seed, start_step * b, process_index)
  ds = ds.map(graph_fn(load), num_parallel_calls=parallel_calls(config))
  ds = ds.batch(b, drop_remainder=True).map(graph_fn(finish))
  ds = ds.prefetch(int(config.data.get("prefetch", 2)))
  return ds.with_options(data_options(config))


def _train_positions(config, lengths, seed, start, process_index) -> tf.data.Dataset:
  """(position, index) pairs from stream position `start`: the curriculum's examples first
  (config.data.curriculum_examples, per host; lengths growing up to the longest training line),
  then epochs of the whole shard."""
  total = int(config.data.get("curriculum_examples", 0) or 0)
  regular = index_stream(len(lengths), seed, max(start - total, 0), process_index)
  if not total:
    return regular
  regular = regular.map(graph_fn(lambda pos, idx: (pos + total, idx)))
  if start >= total:
    return regular
  indices = curriculum_indices(
      lengths, num_examples=total, start_digits=int(config.data.curriculum_start_digits),
      max_digits=train_max_digits(config), seed=seed, process_index=process_index)
  head = tf.data.Dataset.from_tensor_slices(
      (np.arange(start, total, dtype=np.int64), indices[start:]))
  return head.concatenate(regular)


def train_iterator(config, *, seed: int, start_step: int = 0, process_index=None,
                   process_count=None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local training batches, deterministic for (config, seed); see module doc.

  Args:
    config: the experiment config (`config.data`, `config.batch_size`).
    seed: the input-order and augmentation seed.
    start_step: yield from this batch on, exactly as an uninterrupted iterator would.
    process_index, process_count: the host and number of hosts (default: from jax).
  """
  ds = train_dataset(config, seed=seed, start_step=start_step, process_index=process_index,
                     process_count=process_count)
  return iter(tfds.as_numpy(ds))


def eval_iterator(config, split: str, *, batch_size: int | None = None, process_index=None,
                  process_count=None) -> Iterator[dict[str, np.ndarray]]:
  """Finite host-local batches covering this host's shard of `split` exactly once, in order.

  Every batch has the full shape; `mask` is False on padding rows. Every host yields the same
  number of batches (hosts with fewer examples get all-padding batches), so collective ops in
  the eval step stay in step.

  Args:
    config: the experiment config.
    split: 'train', 'validation' or 'test'.
    batch_size: global batch; default config.eval_batch_size, else config.batch_size.
    process_index, process_count: the host and number of hosts (default: from jax).
  """
  _check_split(split)
  process_index, process_count = _process(process_index, process_count)
  if batch_size is None:
    batch_size = config.get("eval_batch_size") or config.batch_size
  b = host_batch_size(int(batch_size), process_count, "eval batch size")
  builder = get_dataset_builder(config)
  n_all = builder.info.splits[split].num_examples
  lo, hi = host_bounds(n_all, process_index, process_count, drop_remainder=False)
  shard = _read_shard(builder, split, lo, hi, decode=True)
  num_batches = math.ceil(math.ceil(n_all / process_count) / b)
  return _eval_batches(shard, b, num_batches)


def _eval_batches(shard, b, num_batches):
  n = shard["length"].shape[0]
  for i in range(num_batches):
    sl = slice(min(i * b, n), min((i + 1) * b, n))
    batch = {"image": shard["image"][sl].astype(np.float32) * np.float32(1 / 255),
             "tokens": shard["tokens"][sl], "length": shard["length"][sl]}
    yield pad_batch(batch, b)
