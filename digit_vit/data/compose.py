"""Composing single digits into one line of handwritten digits (numpy + PIL, ~0.1 ms a digit).

`compose_line` writes 1..max_digits digits left to right on one line of a fixed canvas, with a
random digit height, gaps from slight overlap to wide, vertical jitter, small rotations and
stroke-thickness changes. Images are uint8 [H, W, 1], ink bright on a dark background.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageFilter

# A digit narrower than this fraction of its height is drawn at this width at least ('1').
_MIN_ASPECT = 0.15
# The narrowest a digit may be made on the canvas, in pixels of height: below this it is unreadable.
MIN_DIGIT_HEIGHT = 8
# Average width / height of an MNIST digit after cropping to its ink (measured: ~0.6).
TYPICAL_ASPECT = 0.6


@dataclasses.dataclass(frozen=True)
class Composition:
  """How lines are composed (all fractions are of the canvas height unless said otherwise).

  Attributes:
    height, width: canvas size in pixels.
    max_digits: the longest line; lengths are uniform over 1..max_digits.
    min_scale, max_scale: digit height (ink box) as a fraction of the canvas height, drawn per line.
    scale_jitter: per-digit relative variation of the height around the line's height.
    min_gap, max_gap: gap between neighbouring digits as a fraction of the line's digit height;
      negative means overlap (never more than half the narrower digit, to keep the order).
    vertical_jitter: per-digit vertical offset, as a fraction of the canvas height.
    max_rotation: per-digit rotation in degrees, uniform in [-max_rotation, max_rotation].
    thicken_prob, thin_prob: per-digit probability of dilating / eroding the strokes (3x3).
  """
  height: int
  width: int
  max_digits: int
  min_scale: float = 0.55
  max_scale: float = 0.9
  scale_jitter: float = 0.1
  min_gap: float = -0.15
  max_gap: float = 0.6
  vertical_jitter: float = 0.08
  max_rotation: float = 10.0
  thicken_prob: float = 0.25
  thin_prob: float = 0.1

  def validate(self) -> None:
    check_canvas(self.height, self.width, self.max_digits)
    if not 0 < self.min_scale <= self.max_scale <= 1:
      raise ValueError(f"need 0 < min_scale <= max_scale <= 1 (config.data.min_scale, "
                       f"config.data.max_scale), got {self.min_scale}, {self.max_scale}")
    if not -0.5 <= self.min_gap <= self.max_gap:
      raise ValueError(f"need -0.5 <= min_gap <= max_gap (config.data.min_gap, max_gap), got "
                       f"{self.min_gap}, {self.max_gap}")
    if not 0 <= self.thicken_prob + self.thin_prob <= 1 or min(self.thicken_prob,
                                                                self.thin_prob) < 0:
      raise ValueError("config.data.thicken_prob and thin_prob must be >= 0 and sum to <= 1")
    if self.vertical_jitter < 0 or self.max_rotation < 0 or self.scale_jitter < 0:
      raise ValueError("config.data.vertical_jitter, max_rotation and scale_jitter must be >= 0")


def check_canvas(height: int, width: int, max_digits: int) -> None:
  """Raises ValueError, saying what to change, when max_digits digits cannot fit the canvas."""
  if not isinstance(max_digits, (int, np.integer)) or max_digits < 1:
    raise ValueError(f"max_digits must be an integer >= 1, got {max_digits!r}; set "
                     "config.max_digits to the longest line to read (default 8)")
  if height < MIN_DIGIT_HEIGHT:
    raise ValueError(f"the canvas height {height} is below {MIN_DIGIT_HEIGHT} pixels, too small "
                     f"for a readable digit; set config.image_height >= {MIN_DIGIT_HEIGHT}")
  need = math.ceil(max_digits * MIN_DIGIT_HEIGHT * TYPICAL_ASPECT)
  if width < need:
    raise ValueError(
        f"a {height}x{width} canvas is too small for max_digits={max_digits}: each digit needs "
        f"about {MIN_DIGIT_HEIGHT * TYPICAL_ASPECT:.1f} pixels of width at least; set "
        f"config.image_width >= {need} or lower config.max_digits to "
        f"<= {max(0, int(width // (MIN_DIGIT_HEIGHT * TYPICAL_ASPECT)))}")


def _prepare_digit(img28: np.ndarray, rng: np.random.Generator, comp: Composition) -> Image.Image:
  """Thickness change and rotation of one 28x28 digit, cropped to its ink."""
  pil = Image.fromarray(img28)
  u = rng.random()
  if u < comp.thicken_prob:
    pil = pil.filter(ImageFilter.MaxFilter(3))
  elif u < comp.thicken_prob + comp.thin_prob:
    thin = pil.filter(ImageFilter.MinFilter(3))
    # Keep the erosion only when it leaves a readable stroke.
    if np.asarray(thin, np.float32).sum() >= 0.4 * np.asarray(pil, np.float32).sum():
      pil = thin
  if comp.max_rotation > 0:
    angle = rng.uniform(-comp.max_rotation, comp.max_rotation)
    pil = pil.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=0)
  box = pil.point(lambda v: 255 if v > 24 else 0).getbbox()  # ink box, ignoring faint fringes
  if box is None:
    box = (0, 0, pil.width, pil.height)
  return pil.crop(box)


def compose_line(digit_images: np.ndarray, rng: np.random.Generator,
                 comp: Composition) -> tuple[np.ndarray, np.ndarray]:
  """Writes the given digits left to right on one canvas.

  Args:
    digit_images: uint8 [n, 28, 28], ink bright, in reading order (1 <= n <= max_digits).
    rng: the random generator (all randomness of the line comes from it).
    comp: the composition settings.

  Returns:
    image: uint8 [H, W, 1], ink bright on dark.
    bboxes: float32 [n, 4], (ymin, xmin, ymax, xmax) of each digit, normalised to [0, 1].
  """
  n = len(digit_images)
  H, W = comp.height, comp.width
  crops = [_prepare_digit(d, rng, comp) for d in digit_images]
  line_h = rng.uniform(comp.min_scale, comp.max_scale) * H
  hs = line_h * (1 + rng.uniform(-comp.scale_jitter, comp.scale_jitter, n))
  ws = np.array([max(c.width / c.height, _MIN_ASPECT) for c in crops]) * hs
  gaps = rng.uniform(comp.min_gap, comp.max_gap, max(n - 1, 0)) * line_h
  if n > 1:  # Overlap at most half the narrower neighbour, so the order stays clear.
    gaps = np.maximum(gaps, -0.5 * np.minimum(ws[:-1], ws[1:]))
  total = ws.sum() + gaps.sum()
  if total > W - 1:  # Shrink everything to fit the canvas width.
    f = (W - 1) / total
    hs, ws, gaps, total = hs * f, ws * f, gaps * f, total * f
  hs = np.clip(hs, 1, H)
  x = rng.uniform(0, W - total)
  max_h = hs.max()
  center = rng.uniform(max_h / 2, H - max_h / 2)
  dys = rng.uniform(-comp.vertical_jitter, comp.vertical_jitter, n) * H

  canvas = np.zeros((H, W), np.uint8)
  bboxes = np.zeros((n, 4), np.float32)
  for i, crop in enumerate(crops):
    h = max(1, int(round(hs[i])))
    w = max(1, int(round(ws[i])))
    x0 = min(max(int(round(x)), 0), W - 1)
    w = min(w, W - x0)
    y0 = int(round(center - h / 2 + dys[i]))
    y0 = min(max(y0, 0), H - h)
    patch = np.asarray(crop.resize((w, h), Image.BILINEAR))
    region = canvas[y0:y0 + h, x0:x0 + w]
    np.maximum(region, patch, out=region)
    bboxes[i] = (y0 / H, x0 / W, (y0 + h) / H, (x0 + w) / W)
    x += ws[i] + (gaps[i] if i < n - 1 else 0)
  return canvas[..., None], bboxes


def sample_line(digits, rng: np.random.Generator, comp: Composition):
  """Draws a length and digits from a DigitSet and composes them.

  Returns:
    (image uint8 [H, W, 1], bboxes float32 [n, 4], labels int32 [n], source ids int64 [n]).
  """
  n = int(rng.integers(1, comp.max_digits + 1))
  pick = rng.integers(0, len(digits), n)
  image, bboxes = compose_line(digits.images[pick], rng, comp)
  return image, bboxes, digits.labels[pick], digits.ids[pick]
