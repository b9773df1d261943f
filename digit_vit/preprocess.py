"""Image preprocessing shared by `predict` (the in-process Reader) and `serving` (an exported
reader): decoding an image file into greyscale, and fitting a line of digits into the model's
canvas at the height the training lines have, in the polarity they have (bright ink on black).

Numpy and Pillow only, so that a reader loaded with `digit_vit.serving` prepares its images with
exactly the code `predict` uses without importing Flax, TensorFlow, ml_collections or SciPy (the
two morphology steps, `binary_erosion` and `grey_dilation`, are SciPy's `ndimage` ones written in
numpy, equal to them bit for bit: tests/test_export.py compares them).
"""

from __future__ import annotations

import io
import math
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
# The paper's brightness is estimated on the image averaged down to at most this many rows.
_PAPER_ROWS = 64
# The percentile of a block's pixels taken as its paper: ink may cover up to the rest, and pixel
# noise moves it by under a standard deviation, which INK_FLOOR clears.
_PAPER_PERCENTILE = 30


class ImageError(ValueError):
  """A file or upload that is not a readable image; the message says which and why."""


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
  if not x.size:
    return None
  if float(np.median(x)) > 0.5:  # Ink covers a minority of a line: the median is paper.
    np.subtract(1.0, x, out=x)
  # A photograph's paper is unevenly lit: subtracting one brightness leaves its brighter side
  # as a grey box around the digits, which no training line has, and drags the crop to it.
  x -= paper_brightness(x)
  np.clip(x, 0.0, 1.0, out=x)
  if float(x.max()) < MIN_INK_CONTRAST:
    return None
  # Ink is decided on a 3x3 mean: a stroke is wider than a pixel, pixel noise is not, so one
  # noisy pixel can neither set the contrast nor stretch the crop to the image's edge.
  local = box_mean3(x)
  peak = float(local.max())
  x /= peak
  local /= peak
  np.clip(x, 0.0, 1.0, out=x)
  x[local < INK_FLOOR] = 0.0
  ink = local >= INK_THRESHOLD
  del local
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


def paper_brightness(x: np.ndarray) -> np.ndarray:
  """float32 [h, w]: the brightness of the paper under every pixel of x [h, w] (ink bright),
  as it varies across a photograph: a low percentile (`_PAPER_PERCENTILE`) of square blocks
  half the image's smaller side, interpolated bilinearly. Ink is bright, so a block's low
  pixels are paper even where strokes cover most of it (a tightly cropped heavy digit). The
  blocks are taken on the image averaged down to at most `_PAPER_ROWS` rows, so the work is a
  pass over the pixels whatever the image's size."""
  h, w = x.shape
  factor = max(1, h // _PAPER_ROWS, w // (_PAPER_ROWS * MAX_ASPECT_RATIO))
  small = x if factor == 1 else _block_mean(x, factor)
  sh, sw = small.shape
  block = max(2, math.ceil(min(sh, sw) / 2))
  gh, gw = math.ceil(sh / block), math.ceil(sw / block)
  padded = np.pad(small, ((0, gh * block - sh), (0, gw * block - sw)), mode="edge")
  blocks = padded.reshape(gh, block, gw, block).transpose(0, 2, 1, 3).reshape(gh, gw, -1)
  grid = np.percentile(blocks, _PAPER_PERCENTILE, axis=-1).astype(np.float32)
  if grid.size == 1:
    return np.full((h, w), grid[0, 0], np.float32)
  return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR), np.float32)


def box_mean3(x: np.ndarray) -> np.ndarray:
  """float32 [h, w]: the mean of x [h, w] over each pixel's 3x3 neighbourhood (edges
  repeated), as two passes of three."""
  for axis in (0, 1):
    p = np.pad(x, [(1, 1) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
    n = x.shape[axis]
    x = (_take(p, axis, 0, n) + _take(p, axis, 1, n + 1) + _take(p, axis, 2, n + 2)) / 3
  return x.astype(np.float32, copy=False)


def stroke_width(ink: np.ndarray) -> float:
  """Mean stroke width in pixels of a bright-ink image: area / half the perimeter (a stroke
  of length L and width w has area L w and perimeter about 2 L)."""
  mask = ink >= INK_THRESHOLD
  boundary = mask & ~binary_erosion(mask)
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
  return grey_dilation(pooled, size), factor


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



def binary_erosion(mask: np.ndarray) -> np.ndarray:
  """`scipy.ndimage.binary_erosion(mask)`: bool [h, w], a pixel of `mask` whose four neighbours
  (up, down, left, right) are in it too; outside the image counts as not in it."""
  mask = np.asarray(mask, bool)
  padded = np.pad(mask, 1, constant_values=False)
  return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
          & padded[1:-1, 2:])


def grey_dilation(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`scipy.ndimage.grey_dilation(x, size=size)`: the maximum of x [h, w] over a window of
  size[0] x size[1] pixels, edges reflected (`d c b a | a b c d | d c b a`). As SciPy places
  it: for an odd size k the window is centred, pixels i - k // 2 to i + k // 2; for an even one
  it runs from i - k // 2 + 1 to i + k // 2.

  Separable, and O(log k) passes an axis (maxima over doubling spans), so a window of 40 costs
  six passes over the pixels rather than forty.
  """
  for axis, k in enumerate(size):
    k = int(k)
    if k <= 1:
      continue
    before = k // 2 - (1 - k % 2)  # Pixels the window reaches before i: k // 2, less 1 if even.
    pad = [(0, 0), (0, 0)]
    pad[axis] = (before, k - 1 - before)
    y = np.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    span = 1
    while 2 * span <= k:  # y[i] becomes the maximum of y[i : i + 2 * span].
      y = np.maximum(_take(y, axis, 0, y.shape[axis] - span), _take(y, axis, span, y.shape[axis]))
      span *= 2
    # The window [i, i + k) is covered by two spans [i, i + span) and [i + k - span, i + k).
    x = np.maximum(_take(y, axis, 0, n), _take(y, axis, k - span, k - span + n))
  return x


def _take(x: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
  return x[start:stop] if axis == 0 else x[:, start:stop]
