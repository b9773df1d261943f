r"""Reads digits from image files with a trained model.

  python -m digit_vit.predict --workdir=runs/default IMAGE_OR_DIR... \
      [--output=readings.csv] [--attention=maps/] [--beam_size=4] [--views=5] \
      [--ensemble=RUN[@CHECKPOINT],...]

Any image Pillow opens (PNG, JPEG, BMP, ...) of any size, grey or colour, light ink on a dark
background or dark ink on light paper: `to_canvas` detects the polarity, crops to the ink and
fits it into the model's canvas, keeping its aspect ratio, at the height the training lines
have. Each image costs bounded work: one that is too large (`MAX_PIXELS`) or too elongated to
hold a readable line (`MAX_ASPECT_RATIO`) is refused before it is decoded, and a line far larger
than the canvas is measured and thickened at a working resolution (`WORKING_SCALE`).

Each file prints its raw tokens, its digits and the confidence (the probability of the reading
under the model); a reading that reached the decoder's maximum length without `<eos>` is marked
`(truncated: ...)`, with a warning on stderr, since the line may hold more digits. A file that
cannot be read is reported by name on stderr, the others are still read, and the exit status is
1. Files are loaded one at a time and read a batch at a time, so memory holds one image and the
small canvases, whatever the number of files. All images go through one compiled decoder at a
fixed batch shape, whatever their number or size. `--output` writes the CSV
`filename,digits,confidence,truncated`. A mistake on the command line (a missing or wrong
`--workdir`, an `--output` or `--attention` that cannot be written) is one line on stderr and
exit status 2, found before the model is loaded or any image read.

The same from Python:

  reader = predict.Reader("runs/default")
  [p.digits for p in reader.read([image_array, pil_image])]
  predict.read_files(reader, ["a.png", "b.jpg"])
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import os
import pathlib
import sys
from typing import BinaryIO, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from scipy import ndimage

from digit_vit import decode, logs, trained, xla_options
from digit_vit.data import buckets
from digit_vit.models import tokens
from digit_vit.models.reader import DigitReader, ModelConfig, patch_mask

# Files a directory argument contributes (others in it are ignored).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Larger images are refused before decoding (a 50-megapixel photo is far more than a line of
# digits needs, and decoding one costs a few hundred MB).
MAX_PIXELS = 50_000_000
# More elongated images are refused before any per-pixel work: even a line that spans one would
# be less than a pixel high on a canvas of ordinary proportions, and fitting one (a 2 x 1.6M-pixel
# strip) costs far more than its size suggests.
MAX_ASPECT_RATIO = 200
# A line whose crop is at least twice this many times its size on the canvas is first pooled to
# between this many and twice as many (by whole blocks of pixels), so that measuring and
# thickening its strokes costs the same for a 49-megapixel photo as for a small scan. The
# lines of the evaluation splits (digits 14-110 pixels high) stay below it and are prepared
# exactly as without it.
WORKING_SCALE = 8

# Where the training lines put their ink (digit_vit/data/compose.py): line heights are drawn
# from 0.55-0.9 of the canvas height, so an input line is fitted to the middle of that range.
LINE_HEIGHT = 0.72
# Background left and right of the ink, as a fraction of the height: the middle of the training
# lines' margins (0 to `config.data.max_margin` = 0.5 of the height a side).
MARGIN = 0.25
# Line widths are multiples of this (the patch width), as the training lines' are.
WIDTH_MULTIPLE = 8
# Training strokes (MNIST at this scale) are about 2.5 canvas pixels wide; thinner input
# strokes (a fine pen photographed large) are thickened to that before downscaling.
STROKE_WIDTH = 2.5
# Ink must stand this far (in [0, 1]) above the background; fainter images read as empty.
MIN_INK_CONTRAST = 0.2
# After normalising the ink to peak 1: darker pixels are background (JPEG noise, paper grain).
INK_FLOOR = 0.15
# Pixels at least this bright define the ink's bounding box.
INK_THRESHOLD = 0.35


class ImageError(ValueError):
  """A file or upload that is not a readable image; the message says which and why."""


@dataclasses.dataclass
class Prediction:
  """One image's reading.

  Attributes:
    filename: the name it was given under ('' for in-memory images).
    tokens: raw decoder outputs without `<sos>`, e.g. [1, 0, 1, 11, 12, ...] for "101";
      the decoder's maximum length (`ModelConfig.max_length`) of them.
    digits: the digits read; '' for an image with no ink.
    confidence: the probability of the reading under the model, exp(log_prob), in [0, 1].
    log_prob: the sum of the log-probabilities of the tokens up to `<eos>`.
    no_ink: the image had no ink, so the model was not run.
    canvas: float32 [H, W] the model input in [0, 1], ink bright (None on error).
    attention: float32 [n, H, W] for the n tokens up to and including `<eos>`: the decoder's
      cross-attention over the image while it wrote each one (when asked for).
    truncated: the decoder reached its maximum length without writing `<eos>`, so the line
      may hold more digits than `digits` has.
    error: why the file could not be read (then the other fields are empty).
  """
  filename: str = ""
  tokens: list[int] = dataclasses.field(default_factory=list)
  digits: str = ""
  confidence: float = 0.0
  log_prob: float = float("-inf")
  no_ink: bool = False
  canvas: np.ndarray | None = None
  attention: np.ndarray | None = None
  truncated: bool = False
  error: str | None = None


# ----------------------------------------------------------------------------------------------
# Images


def load_image(source: str | os.PathLike | bytes | BinaryIO, *,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Decodes an image file into greyscale.

  Transparent images are laid on a background that contrasts with their ink (a drawing of
  black strokes on a transparent canvas reads as black on white). EXIF rotation is applied.

  Args:
    source: a path, the file's bytes, or a binary file object.
    max_pixels: larger images are refused.

  Returns:
    uint8 [H, W].

  Raises:
    ImageError: missing file, not an image, too large or too elongated (`MAX_ASPECT_RATIO`);
      the message names the source.
  """
  name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "upload"
  data = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  try:
    with Image.open(data) as image:
      if image.width * image.height > max_pixels:
        raise ImageError(f"{name}: {image.width}x{image.height} pixels is more than the "
                         f"{max_pixels:,} accepted; crop or downscale it")
      _check_aspect_ratio(image.height, image.width, name)
      image = ImageOps.exif_transpose(image)
      return _to_grey(image)
  except FileNotFoundError:
    raise ImageError(f"{name}: no such file") from None
  except IsADirectoryError:
    raise ImageError(f"{name}: is a directory") from None
  except UnidentifiedImageError:
    raise ImageError(f"{name}: not a readable image (PNG, JPEG or BMP expected)") from None
  except Image.DecompressionBombError as e:
    raise ImageError(f"{name}: {e}") from None
  except OSError as e:  # Truncated or corrupt files.
    raise ImageError(f"{name}: cannot decode the image: {e}") from None


def _check_aspect_ratio(height: int, width: int, name: str = "image") -> None:
  if min(height, width) > 0 and max(height, width) > MAX_ASPECT_RATIO * min(height, width):
    raise ImageError(f"{name}: {width}x{height} pixels is more elongated than "
                     f"{MAX_ASPECT_RATIO}:1, too thin for a readable line of digits; crop it "
                     f"to the line")


def _to_grey(image: Image.Image) -> np.ndarray:
  if image.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit and float: stretch to 8 bits.
    x = np.asarray(image, np.float64)
    span = x.max() - x.min()
    return np.zeros(x.shape, np.uint8) if span == 0 else np.uint8((x - x.min()) / span * 255)
  if image.mode == "P" or "A" in image.getbands():
    image = image.convert("LA")
    grey, alpha = (np.asarray(c, np.float32) for c in image.split())
    opaque = alpha > 127
    if not opaque.any():
      return np.zeros(grey.shape, np.uint8)
    background = 255.0 if grey[opaque].mean() < 128 else 0.0
    a = alpha / 255
    return np.uint8(np.round(grey * a + background * (1 - a)))
  return np.asarray(image.convert("L"), np.uint8)


def as_grey_array(image: np.ndarray | Image.Image) -> np.ndarray:
  """A PIL image, or an array [H, W], [H, W, 1|3|4] (uint8, or float in [0, 1]) -> [H, W]
  float32 in [0, 1], always a new array (never the caller's)."""
  if isinstance(image, Image.Image):
    image = _to_grey(image)
  x = np.asarray(image)
  if x.ndim == 3 and x.shape[-1] in (1, 3, 4):
    x = x[..., 0] if x.shape[-1] == 1 else x[..., :3] @ np.array([0.299, 0.587, 0.114])
  if x.ndim != 2:
    raise ImageError(f"an image array must be [H, W] or [H, W, 1|3|4], got shape {x.shape}")
  x = x.astype(np.float32)  # A copy, even of float32: the callers work on it in place.
  if np.issubdtype(np.asarray(image).dtype, np.integer) or x.max() > 1:
    x /= 255
  return x


def to_canvas(image: np.ndarray | Image.Image, height: int, width: int) -> np.ndarray | None:
  """Normalises an image of a line of digits into a line as the model reads it.

  Ink is made bright on black (the polarity is the opposite of the median pixel, since ink
  covers a minority of the image), stretched to peak 1, cropped to its bounding box, thickened
  if its strokes would end up thinner than the training digits', and scaled to the training
  lines' digit height (`LINE_HEIGHT` of `height`), never distorted. The line keeps its natural
  width: the ink plus a margin of `MARGIN` of the height on each side, rounded up to a multiple
  of `WIDTH_MULTIPLE`, as the training lines are (`data/compose.py`). A line wider than `width`
  (the widest bucket) is shrunk to fit it: its digits then come out smaller than the training
  lines', which reads worse, so `width` should hold the longest line a reader is meant for.
  Beyond a few passes over the pixels, the work is bounded by the output, not the image: a crop
  much larger than it is measured and thickened at a working resolution (`_working_ink`).

  Args:
    image: see `as_grey_array`.
    height: the model's image height.
    width: the widest line (the widest width bucket).

  Returns:
    float32 [height, w] in [0, 1], w a multiple of WIDTH_MULTIPLE in [WIDTH_MULTIPLE, width],
    or None when the image has no ink.

  Raises:
    ImageError: not an image array, or more elongated than `MAX_ASPECT_RATIO` (checked before
      any per-pixel work).
  """
  shape = (image.height, image.width) if isinstance(image, Image.Image) else np.shape(image)
  if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4)):
    _check_aspect_ratio(shape[0], shape[1])
  # `x` is a new array, so the steps below work in place: a 49-megapixel image is 196 MB a copy.
  x = as_grey_array(image)
  background = float(np.median(x)) if x.size else 0.0
  if background > 0.5:
    np.subtract(1.0, x, out=x)
    background = 1.0 - background
  x -= background
  peak = float(x.max()) if x.size else 0.0
  if peak < MIN_INK_CONTRAST:
    return None
  x /= peak
  np.clip(x, 0.0, 1.0, out=x)
  x[x < INK_FLOOR] = 0.0
  ink = x >= INK_THRESHOLD
  rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
  x = x[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  crop_h, crop_w = x.shape
  margin = MARGIN * height
  scale = min(LINE_HEIGHT * height / crop_h, (width - 2 * margin) / crop_w)
  out_h = max(1, min(height, round(crop_h * scale)))
  out_w = max(1, min(width, round(crop_w * scale)))
  x, factor = _working_ink(x, scale)
  # Pillow's bilinear resize is antialiased when shrinking, like the training composition. The
  # box is the crop's extent in working pixels (a last partial block is not stretched over a
  # whole pixel); for an unpooled crop it is the whole image, Pillow's default.
  fitted = Image.fromarray(np.uint8(np.round(x * 255))).resize(
      (out_w, out_h), Image.BILINEAR, box=(0, 0, crop_w / factor, crop_h / factor))
  line_w = min(width, WIDTH_MULTIPLE * math.ceil((out_w + 2 * margin) / WIDTH_MULTIPLE))
  canvas = np.zeros((height, line_w), np.float32)
  top, left = (height - out_h) // 2, (line_w - out_w) // 2
  canvas[top:top + out_h, left:left + out_w] = np.asarray(fitted, np.float32) / 255
  return canvas


def stroke_width(ink: np.ndarray) -> float:
  """Mean stroke width in pixels of a bright-ink image: area / half the perimeter (a stroke
  of length L and width w has area L w and perimeter about 2 L)."""
  mask = ink >= INK_THRESHOLD
  boundary = mask & ~ndimage.binary_erosion(mask)
  return 2.0 * mask.sum() / max(int(boundary.sum()), 1)


def _working_ink(ink: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
  """The cropped ink at a bounded working resolution, thickened if its strokes would end up
  thinner than the training digits' (`STROKE_WIDTH` canvas pixels).

  A crop 2 * WORKING_SCALE times its size on the canvas or more is pooled over blocks of `factor`
  x `factor` pixels to between WORKING_SCALE and 2 * WORKING_SCALE times that size: by their
  maximum to measure the strokes, and to thicken them (pooling by maximum is a dilation too,
  and keeps a hairline bright where a mean would fade it below the ink threshold), by their
  mean otherwise (what the antialiased resize averages anyway). So the stroke measurement and
  the dilation see at most (2 * WORKING_SCALE)^2 times the canvas's pixels, and the dilation's
  window is under 5 * WORKING_SCALE pixels (the stroke width measured is at least 2), whatever
  the image; a smaller crop is not pooled (factor 1) and comes back as before.

  Args:
    ink: float32 [h, w] in [0, 1], cropped to the ink.
    scale: canvas pixels per `ink` pixel.

  Returns:
    (float32 [ceil(h / factor), ceil(w / factor)] in [0, 1], factor).
  """
  factor = max(1, int(1 / (WORKING_SCALE * scale)))
  pooled = ink if factor == 1 else _pool(ink, factor, np.maximum)
  scale *= factor
  width = stroke_width(pooled)
  if width * scale >= STROKE_WIDTH - 0.5:
    return (ink if factor == 1 else _block_mean(ink, factor)), factor
  grow = int(np.ceil(STROKE_WIDTH / scale - width))
  # A window over twice an axis's length covers all of it from every pixel (the edges
  # reflect), so capping it there changes nothing, and a strip of ink one pixel high costs its
  # length, not its length times the window.
  size = tuple(min(grow + 1, 2 * n + 1) for n in pooled.shape)
  return ndimage.grey_dilation(pooled, size=size), factor


def _pool(x: np.ndarray, factor: int, reduce: np.ufunc) -> np.ndarray:
  """`reduce` (np.maximum, np.add) over blocks of factor x factor pixels of x [h, w], the last
  ones partial: [ceil(h / factor), ceil(w / factor)]."""
  for axis in (0, 1):
    x = reduce.reduceat(x, np.arange(0, x.shape[axis], factor), axis=axis)
  return x


def _block_mean(x: np.ndarray, factor: int) -> np.ndarray:
  """The mean over blocks of factor x factor pixels (see `_pool`), float32."""
  counts = [np.diff(np.append(np.arange(0, n, factor), n)) for n in x.shape]
  return (_pool(x, factor, np.add) / np.outer(*counts)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The model


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir/config.json`; it must be a 'read' run."""
  return trained.load_config(workdir, task="read")


class Reader:
  """A trained model, ready to read images.

  Args:
    workdir: a training run's directory (config.json and checkpoints/).
    checkpoint: 'best', 'latest' or a step (see `trained.restore_params`).
    beam_size, alpha, views: decoding (default: the run's config.decode; 1 = greedy on the
      image alone).
    batch_size: images per call of the compiled decoder; every call has this shape.
    ensemble: further runs that read together with this one, 'WORKDIR' or
      'WORKDIR@CHECKPOINT' (`trained.restore_ensemble`): each token is picked by the mean
      probability over the models (and views), and the confidence is under that mean. The
      attention maps stay those of `workdir`'s model.
  """

  def __init__(self, workdir: str | os.PathLike, *, checkpoint: str | int = "best",
               beam_size: int | None = None, alpha: float | None = None,
               views: int | None = None, batch_size: int = 16,
               ensemble: Sequence[str | os.PathLike] = ()):
    config = load_config(workdir)
    readers, described = trained.restore_ensemble(config, ensemble)
    params, step = trained.restore_params(workdir, config, checkpoint)
    self._setup(config, params, step, readers, described, beam_size=beam_size, alpha=alpha,
                views=views, batch_size=batch_size)

  @classmethod
  def from_params(cls, config: ml_collections.ConfigDict, params, *, step: int = 0,
                  beam_size: int | None = None, alpha: float | None = None,
                  views: int | None = None, batch_size: int = 16, ensemble=(),
                  described=()) -> "Reader":
    """A reader of parameters in hand (a run's config and its model's params), as training
    and `evaluate` read the file splits (`file_evaluation`); `ensemble` and `described` as
    `trained.restore_ensemble` returns them."""
    reader = cls.__new__(cls)
    reader._setup(config, params, step, ensemble, list(described), beam_size=beam_size,
                  alpha=alpha, views=views, batch_size=batch_size)
    return reader

  def _setup(self, config, params, step, readers, described, *, beam_size, alpha, views,
             batch_size):
    self.config = config
    self.model_config = ModelConfig.from_config(config.model)
    self.ensemble = described
    self._ensemble_configs = tuple(c for c, _ in readers)
    self._ensemble_params = tuple(p for _, p in readers)
    self.params, self.step = params, step
    self.beam_size, self.alpha, self.views = trained.decoding(config, beam_size, alpha, views)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = batch_size
    self.height, self.width = self.model_config.image_height, self.model_config.image_width
    self.buckets = buckets.width_buckets(self.config)
    self.max_length = trained.read_length(self.config)  # Tokens a reading may write.
    self.traces = 0  # Compilations of the reading function: one per width bucket used.
    self._read_batch = xla_options.jit(self._read_fn)
    self._attention_batch = xla_options.jit(functools.partial(cross_attention,
                                                              self.model_config))

  def _read_fn(self, params, ensemble_params, images, widths):
    self.traces += 1
    # A lone model is an ensemble of one to `decode`.
    return decode.decode((self.model_config, *self._ensemble_configs),
                         (params, *ensemble_params), images, widths=widths,
                         beam_size=self.beam_size, alpha=self.alpha, views=self.views,
                         max_length=self.max_length)

  def prepare(self, images: Sequence[np.ndarray | Image.Image]) -> list[np.ndarray | None]:
    """The model inputs of `images` (see `to_canvas`): float32 [H, w] each, w a multiple of 8
    up to the widest bucket, None for no ink.

    Pure numpy and Pillow: a server runs it outside the lock that guards the model."""
    return [to_canvas(image, self.height, self.width) for image in images]

  def read(self, images: Sequence[np.ndarray | Image.Image], *, attention: bool = False,
           filenames: Sequence[str] | None = None) -> list[Prediction]:
    """Reads each image (see `to_canvas` for what is accepted).

    Args:
      images: arrays or PIL images of any size.
      attention: fill `Prediction.attention` (an extra teacher-forced pass).
      filenames: names to put in the predictions.
    """
    return self.read_prepared(self.prepare(images), attention=attention, filenames=filenames)

  def read_prepared(self, canvases: Sequence[np.ndarray | None], *, attention: bool = False,
                    filenames: Sequence[str] | None = None) -> list[Prediction]:
    """Reads what `prepare` made (None: an image with no ink); see `read`.

    Lines are read in batches of `batch_size` of one width bucket each (the narrowest that
    holds them), padded on the right with background, so the decoder compiles once a bucket.
    """
    filenames = list(filenames) if filenames is not None else [""] * len(canvases)
    predictions = [_no_ink(name, self.height, self.max_length) for name in filenames]
    inked = [i for i, c in enumerate(canvases) if c is not None]
    bucket_of = buckets.bucket_index([canvases[i].shape[1] for i in inked], self.buckets)
    for bucket in sorted(set(int(b) for b in bucket_of)):
      in_bucket = [i for i, b in zip(inked, bucket_of) if b == bucket]
      width = self.buckets[bucket]
      for start in range(0, len(in_bucket), self.batch_size):
        rows = in_bucket[start:start + self.batch_size]
        batch = np.zeros((self.batch_size, self.height, width, 1), np.float32)
        # Padding rows are blank lines of the whole width: every column valid, nothing read.
        widths = np.full((self.batch_size,), width, np.int32)
        for j, i in enumerate(rows):
          batch[j, :, :canvases[i].shape[1], 0] = canvases[i]
          widths[j] = canvases[i].shape[1]
        outputs, log_prob = self._read_batch(self.params, self._ensemble_params, batch, widths)
        weights = (self._attention_batch(self.params, batch, widths, outputs) if attention
                   else None)
        outputs, log_prob, weights = jax.device_get((outputs, log_prob, weights))
        for j, i in enumerate(rows):
          maps = None if weights is None else weights[j, :, :, :canvases[i].shape[1]]
          predictions[i] = _prediction(filenames[i], outputs[j], float(log_prob[j]),
                                       canvases[i], maps)
    return predictions


def cross_attention(model_config: ModelConfig, params, images, widths, outputs):
  """Where the decoder looked while writing each output token.

  Re-runs the decoder teacher-forced on its own outputs and averages the cross-attention
  weights over heads and blocks.

  Args:
    images: float [batch, H, W, C], padded on the right past `widths`.
    widths: int32 [batch] each image's width in pixels.
    outputs: int32 [batch, length] raw outputs (no `<sos>`).

  Returns:
    float32 [batch, length, H, W]: each output token's attention spread over its patches'
    pixels (a token's map sums to 1 over the patches; none falls on the padding).
  """
  model = DigitReader(model_config)
  inputs = jnp.concatenate([jnp.full_like(outputs[:, :1], tokens.SOS), outputs[:, :-1]], 1)
  memory = model.apply({"params": params}, images, widths=widths, method=DigitReader.encode)
  memory_mask = patch_mask(model_config, widths, images.shape[2])
  _, weights = model.apply({"params": params}, inputs, memory, memory_mask=memory_mask,
                           return_weights=True, method=DigitReader.decode_tokens)
  weights = jnp.mean(jnp.stack(weights), axis=(0, 2))  # [batch, length, patches]
  rows, cols = model_config.grid_for(images.shape[2])
  patch_h, patch_w = model_config.patch_size
  grid = weights.reshape(weights.shape[:2] + (rows, cols))
  return jnp.repeat(jnp.repeat(grid, patch_h, axis=2), patch_w, axis=3)


def _prediction(filename, outputs, log_prob, canvas, attention) -> Prediction:
  """The Prediction of one image from its raw outputs [max_length] (no `<sos>`), the sum of
  their log-probabilities, its canvas and its maps [max_length, H, W] (or None)."""
  reading = tokens.read_output(outputs)
  # The map of each token up to and including <eos> (or all, for an output that never ended).
  shown = len(reading.digits) + 1 if reading.ended else len(outputs)
  return Prediction(filename=filename, tokens=[int(t) for t in outputs], digits=reading.digits,
                    confidence=float(np.exp(log_prob)), log_prob=log_prob, canvas=canvas,
                    attention=None if attention is None else np.asarray(attention[:shown]),
                    truncated=not reading.ended)


def _no_ink(filename: str, height: int, max_length: int) -> Prediction:
  return Prediction(filename=filename, tokens=[tokens.EOS] + [tokens.PAD] * (max_length - 1),
                    digits="", confidence=1.0, log_prob=0.0, no_ink=True,
                    canvas=np.zeros((height, WIDTH_MULTIPLE), np.float32))


# ----------------------------------------------------------------------------------------------
# Files


def expand_paths(arguments: Iterable[str]) -> list[tuple[str, pathlib.Path]]:
  """Image paths to read, as (name to report, path): files as given; the image files under a
  directory argument (recursively, sorted), named relative to it."""
  found = []
  for argument in arguments:
    path = pathlib.Path(argument)
    if path.is_dir():
      for child in sorted(p for p in path.rglob("*") if p.is_file()):
        if child.suffix.lower() in IMAGE_SUFFIXES:
          found.append((child.relative_to(path).as_posix(), child))
    else:
      found.append((argument, path))
  return found


def iter_read_files(reader: Reader, arguments: Iterable[str], *,
                    attention: bool = False) -> Iterator[Prediction]:
  """Reads files and directories (see `expand_paths`), yielding a Prediction a file in their
  order as each batch is read; a file that cannot be read gets one with `error` set, and the
  others are still read.

  Each file is loaded and prepared (`Reader.prepare`) alone, so memory holds one image and the
  canvases of at most a batch (`reader.batch_size`) of files with ink, not every image at once
  (20 files of 49 megapixels are 1.9 GB).
  """
  pending = []  # (name, canvas or None, error or None) of the files not yet yielded, in order.
  inked = 0

  def flush():
    read = iter(reader.read_prepared([c for _, c, e in pending if e is None],
                                     attention=attention,
                                     filenames=[n for n, _, e in pending if e is None]))
    done = [Prediction(filename=n, error=e) if e is not None else next(read)
            for n, _, e in pending]
    pending.clear()
    return done

  for name, path in expand_paths(arguments):
    try:
      canvas = reader.prepare([load_image(path)])[0]
    except ImageError as e:
      pending.append((name, None, str(e)))
      continue
    pending.append((name, canvas, None))
    inked += canvas is not None
    if inked == reader.batch_size:  # A full batch for the compiled decoder.
      yield from flush()
      inked = 0
  yield from flush()


def read_files(reader: Reader, arguments: Iterable[str], *,
               attention: bool = False) -> list[Prediction]:
  """`iter_read_files` as a list."""
  return list(iter_read_files(reader, arguments, attention=attention))


def write_csv(predictions: Iterable[Prediction], path: str | os.PathLike) -> None:
  """Rows `filename,digits,confidence,truncated` (with that header; truncated: `true` for a
  reading that reached the decoder's maximum length without `<eos>`, else `false`) for the
  files that were read."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["filename", "digits", "confidence", "truncated"])
    for p in predictions:
      if p.error is None:
        writer.writerow([p.filename, p.digits, f"{p.confidence:.6f}",
                         "true" if p.truncated else "false"])


def attention_overlay(prediction: Prediction, *, scale: int = 4) -> Image.Image:
  """The reading's attention maps as one RGB picture.

  One row per output token (each digit, then `<eos>`): the canvas in grey with the decoder's
  cross-attention for that token in red-yellow on top, labelled with the token on the left.
  """
  if prediction.canvas is None or prediction.attention is None:
    raise ValueError("no attention maps: read with attention=True (and an image with ink)")
  canvas = prediction.canvas
  height, width = canvas.shape
  names = [tokens.TOKEN_NAMES[t] for t in prediction.tokens[:len(prediction.attention)]]
  label_w, gap = 12 * max(len(n) for n in names) + 10, 4
  row_h = height * scale
  out = Image.new("RGB", (label_w + width * scale, len(names) * (row_h + gap) - gap), "white")
  draw = ImageDraw.Draw(out)
  grey = np.repeat(canvas[..., None], 3, axis=-1) * 0.75
  for i, (name, heat) in enumerate(zip(names, prediction.attention)):
    heat = heat / max(float(heat.max()), 1e-9)
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1)  # red->yellow
    alpha = 0.7 * heat[..., None]
    rgb = np.uint8(np.round(255 * np.clip(grey * (1 - alpha) + colour * alpha, 0, 1)))
    tile = Image.fromarray(rgb).resize((width * scale, row_h), Image.NEAREST)
    top = i * (row_h + gap)
    out.paste(tile, (label_w, top))
    draw.text((4, top + row_h // 2 - 6), name, fill="black")
  return out


def attention_path(directory: str | os.PathLike, filename: str) -> pathlib.Path:
  """Where `predict --attention DIR` writes the maps of `filename` (its path kept below DIR)."""
  relative = pathlib.PurePath(filename.replace("\\", "/"))
  parts = [p for p in relative.parts if p not in ("/", "..", ".")] or ["image"]
  return pathlib.Path(directory, *parts).with_name(parts[-1] + ".attention.png")


# ----------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command's flags when it runs, not on import: absl flags are global and
  `main` and `evaluate` define --workdir too."""
  flags.DEFINE_string("workdir", None, "A training run's directory (config.json, checkpoints/).")
  flags.DEFINE_string("checkpoint", "best", "'best' (by validation), 'latest', or a step.")
  flags.DEFINE_string("output", None, "Write rows filename,digits,confidence,truncated to this "
                      "CSV file (its directory must exist).")
  flags.DEFINE_string("attention", None, "Write each image's attention maps as PNG under this "
                      "directory (made if missing).")
  flags.DEFINE_integer("beam_size", None, "Beam size (default: the run's config.decode; 1 = "
                       "greedy).")
  flags.DEFINE_float("alpha", None, "Beam length normalisation (default: the run's config).")
  flags.DEFINE_integer("views", None, "Test-time views: shifted copies of each image whose "
                       "probabilities are averaged (default: the run's config.decode; 1 = the "
                       "image alone).")
  flags.DEFINE_integer("batch_size", 16, "Images per call of the compiled decoder.")
  flags.DEFINE_list("ensemble", [], "Further runs read together with --workdir's model, "
                    "WORKDIR or WORKDIR@CHECKPOINT (default: its best): each token is picked by "
                    "the mean probability over the models (and views).")


def format_prediction(p: Prediction) -> str:
  """`name  digits=101  confidence=0.9873  tokens=[1, 0, 1, 11, 12, ...]`, then `(no ink)`, or
  `(truncated: no <eos> within N tokens)` for a reading that reached the decoder's maximum."""
  note = "  (no ink)" if p.no_ink else ""
  if p.truncated:
    note = f"  (truncated: no <eos> within {len(p.tokens)} tokens)"
  return (f"{p.filename}  digits={p.digits or '-'}  confidence={p.confidence:.4f}  "
          f"tokens={p.tokens}{note}")


def check_output_file(flag: str, value: str) -> str | None:
  """Why the file `value` that `flag` names cannot be written, or None (see
  `check_output_paths`)."""
  path = pathlib.Path(value)
  if path.is_dir():
    return f"{flag}={value} is a directory: give a file's path in it"
  if not path.parent.is_dir():
    return f"{flag}={value}: there is no directory {path.parent}; create it first"
  if not os.access(path if path.exists() else path.parent, os.W_OK):
    return f"{flag}={value} cannot be written: no permission"
  return None


def check_output_paths(output: str | None, attention_dir: str | None) -> str | None:
  """Why `--output` (a CSV file) or `--attention` (a directory, made if missing) cannot be
  written, or None. The command checks them before it loads the model and reads, so that a
  typo costs a second rather than the whole run."""
  if output:
    problem = check_output_file("--output", output)
    if problem:
      return problem
  if attention_dir:
    path = pathlib.Path(attention_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())  # '/' or '.' at the latest.
    if not existing.is_dir():
      return (f"--attention={attention_dir}: {existing} is a file; give a directory for the "
              f"maps")
    if not os.access(existing, os.W_OK | os.X_OK):
      return f"--attention={attention_dir}: cannot write in {existing}: no permission"
  return None


def run(reader: Reader, arguments: Sequence[str], *, output: str | None = None,
        attention_dir: str | None = None) -> list[Prediction]:
  """The command: reads, printing each file's reading as its batch is read (and a warning on
  stderr for a truncated one), writes the maps and then the CSV; returns the predictions,
  without the attention maps it wrote."""
  predictions = []
  for p in iter_read_files(reader, arguments, attention=attention_dir is not None):
    predictions.append(p)
    if p.error is not None:
      print(f"error: {p.error}", file=sys.stderr)
      continue
    print(format_prediction(p), flush=True)
    if p.truncated:
      print(f"warning: {p.filename}: the reading reached the decoder's maximum of "
            f"{len(p.tokens)} tokens without <eos>; the line may hold more digits than the "
            f"{len(p.digits)} read", file=sys.stderr)
    if attention_dir is not None and not p.no_ink:
      path = attention_path(attention_dir, p.filename)
      path.parent.mkdir(parents=True, exist_ok=True)
      attention_overlay(p).save(path)
      p.attention = None  # Written: kept, the maps of many files would fill the memory.
  if output:
    write_csv(predictions, output)
  return predictions


def _usage_error(message: str) -> int:
  """A mistake on the command line: its one line on stderr, and exit status 2 (absl's
  app.UsageError would print every flag's help before it)."""
  print(f"error: {message}", file=sys.stderr)
  return 2


def main(argv):
  if len(argv) < 2:
    return _usage_error("give one or more image files or directories to read (--helpshort "
                        "lists the flags)")
  if not FLAGS.workdir:
    return _usage_error("--workdir is required: a training run's directory")
  problem = check_output_paths(FLAGS.output, FLAGS.attention)
  if problem:
    return _usage_error(problem)
  logs.quiet_libraries()
  try:
    checkpoint = trained.parse_checkpoint(FLAGS.checkpoint)
  except ValueError as e:
    return _usage_error(f"--checkpoint={e}")
  try:
    reader = Reader(FLAGS.workdir, checkpoint=checkpoint, beam_size=FLAGS.beam_size,
                    alpha=FLAGS.alpha, views=FLAGS.views, batch_size=FLAGS.batch_size,
                    ensemble=FLAGS.ensemble)
  except (ValueError, FileNotFoundError) as e:  # A wrong run, checkpoint or decoding setting.
    return _usage_error(str(e))
  predictions = run(reader, argv[1:], output=FLAGS.output, attention_dir=FLAGS.attention)
  failures = sum(p.error is not None for p in predictions)
  if failures:
    print(f"{failures} of {len(predictions)} file(s) could not be read", file=sys.stderr)
  if not predictions:
    print("no image files found", file=sys.stderr)
  return 1 if failures or not predictions else 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
