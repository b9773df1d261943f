"""Composing single digits into one line of handwritten digits (numpy + PIL, ~0.1 ms a digit).

`compose_line` writes 1..max_digits digits left to right on one line of height H and of the
width the line needs: its digits, their gaps and a random margin, rounded up to a multiple of
`WIDTH_MULTIPLE` (the patch width), never wider than the widest width bucket (`Composition.width`;
a longer line is shrunk to fit). A line varies as written lines do: digit heights within the
line, gaps from overlapping to wide, bottom-, centre-aligned or jittered digits, a slant and a
pen (hairline to heavy) per line, small rotations, and a rendering (blur, faint digits, noise)
as `predict` hands a photographed line to the reader: polarity and contrast normalised, ink
bright with peak 1 on a dark background, faint noise below `INK_FLOOR` cleared.

Images are uint8 [H, W, 1], W a multiple of `WIDTH_MULTIPLE`, ink bright on a dark background.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

# A digit narrower than this fraction of its height is drawn at this width at least ('1').
_MIN_ASPECT = 0.15
# The narrowest a digit may be made on the canvas, in pixels of height: below this it is unreadable.
MIN_DIGIT_HEIGHT = 8
# A narrow width / height of an MNIST digit after cropping to its ink: the legibility check's
# (a digit of MIN_DIGIT_HEIGHT keeps about 5 pixels of width).
TYPICAL_ASPECT = 0.6
# The mean width / height of a digit as `compose_line` draws it (cropped to its ink, slanted,
# rotated, in its pen; measured over the embedded train digits: 0.85, 0.82 unstyled): with
# the mean gap, a line of n digits is about n (0.85 + gap) digit heights wide.
MEAN_ASPECT = 0.85
# Every line's width is a multiple of this (the reader's patch width): the input pipeline pads
# lines on the right to a width bucket, and a bucket is a multiple of it too.
WIDTH_MULTIPLE = 8
# `preprocess.INK_FLOOR`, repeated here so that composing needs no JAX: after stretching the ink to
# peak 1, predict clears everything fainter than this, so the reader never sees faint noise.
INK_FLOOR = 0.15
# The side of the square a digit is slanted and rotated on: the 28x28 MNIST digit turned by
# 15 degrees and sheared by 0.5 still fits, so nothing of it is cut.
_WORK = 48
# An elastic distortion moves a digit's pixels by a smooth field: independent displacements on a
# grid of this many points a side, interpolated over the 28x28 digit (about 9 pixels apart).
_ELASTIC_GRID = 4


@dataclasses.dataclass(frozen=True)
class Composition:
  """How lines are composed (all fractions are of the line height H unless said otherwise).

  Attributes:
    height: the line height H in pixels.
    width: the widest a line may be (the widest width bucket); wider lines are shrunk to fit.
    max_digits: the longest line; lengths are uniform over 1..max_digits.
    min_scale, max_scale: digit height (ink box) as a fraction of H, drawn per line.
    scale_jitter: per-digit relative variation of the height around the line's height (+-).
    min_gap, max_gap: gap between neighbouring digits as a fraction of the line's digit height;
      negative means touching or overlapping.
    max_overlap: the most two neighbours overlap, as a fraction of the narrower one's width.
    vertical_jitter: per-digit vertical offset on 'jittered' lines, as a fraction of H (+-).
    bottom_prob, centre_prob: probability that a line's digits sit on one baseline (bottoms
      aligned) / are centred on one line; the other lines are centred with per-digit jitter.
    max_rotation: per-digit rotation in degrees, uniform in [-max_rotation, max_rotation].
    max_slant: a line's slant, uniform in +-max_slant (x shifts by slant * height above centre).
    thin_prob, thicken_prob, heavy_prob: probability that a line's pen is a hairline (3x3
      erosion of the 28x28 digits where it leaves 40% of the ink, else 2x2), thick (3x3 dilation:
      strokes 2 pixels wider), heavy (3x3 then 2x2 dilation: 3 pixels wider, about twice an
      MNIST stroke); the rest are drawn as the digits are.
    blur_prob, max_blur: probability of a Gaussian blur of the line, radius uniform in
      [0.3, max_blur] pixels.
    faint_prob, min_ink: probability that a line's digits are inked unevenly: each digit's peak
      uniform in [min_ink, 1] (the line is then stretched to peak 1, as predict does).
    noise_prob, max_noise: probability of Gaussian pixel noise of std uniform in
      [0.01, max_noise]; after stretching, noise below INK_FLOOR is cleared as predict clears it.
    max_margin: background before the first and after the last digit, each uniform in
      [0, max_margin] of H.
    digit_elastic: std in pixels of the 28x28 digit of a smooth random displacement (an elastic
      distortion, Simard et al. 2003) that makes every drawn digit a new shape; 0 = none. The
      dataset builder applies it to the train split only (`training_only`).
  """
  height: int
  width: int
  max_digits: int
  min_scale: float = 0.55
  max_scale: float = 0.9
  scale_jitter: float = 0.25
  min_gap: float = -0.2
  max_gap: float = 0.6
  max_overlap: float = 0.25
  vertical_jitter: float = 0.08
  bottom_prob: float = 0.35
  centre_prob: float = 0.35
  max_rotation: float = 10.0
  max_slant: float = 0.3
  thin_prob: float = 0.15
  thicken_prob: float = 0.2
  heavy_prob: float = 0.1
  blur_prob: float = 0.25
  max_blur: float = 1.2
  faint_prob: float = 0.2
  min_ink: float = 0.5
  noise_prob: float = 0.25
  max_noise: float = 0.08
  max_margin: float = 0.5
  digit_elastic: float = 0.0

  def validate(self) -> None:
    """Raises ValueError saying which config field to change."""
    check_canvas(self.height, self.width, self.max_digits, comp=self)
    if self.width % WIDTH_MULTIPLE:
      raise ValueError(f"the widest line, config.image_width={self.width}, must be a multiple of "
                       f"{WIDTH_MULTIPLE} (every line's width is)")
    if not 0 < self.min_scale <= self.max_scale <= 1:
      raise ValueError(f"need 0 < min_scale <= max_scale <= 1 (config.data.min_scale, "
                       f"config.data.max_scale), got {self.min_scale}, {self.max_scale}")
    if not -0.5 <= self.min_gap <= self.max_gap:
      raise ValueError(f"need -0.5 <= min_gap <= max_gap (config.data.min_gap, max_gap), got "
                       f"{self.min_gap}, {self.max_gap}")
    if not 0 <= self.max_overlap <= 0.5:
      raise ValueError(f"config.data.max_overlap must be in [0, 0.5] (more hides the order of "
                       f"the digits), got {self.max_overlap}")
    for group in (("thin_prob", "thicken_prob", "heavy_prob"), ("bottom_prob", "centre_prob")):
      probs = [getattr(self, k) for k in group]
      if min(probs) < 0 or sum(probs) > 1:
        raise ValueError(f"config.data.{', '.join(group)} must be >= 0 and sum to <= 1, got "
                         f"{probs}")
    for k in ("blur_prob", "faint_prob", "noise_prob"):
      if not 0 <= getattr(self, k) <= 1:
        raise ValueError(f"config.data.{k} must be in [0, 1], got {getattr(self, k)}")
    if not 0 < self.min_ink <= 1:
      raise ValueError(f"config.data.min_ink must be in (0, 1], got {self.min_ink}")
    for k in ("vertical_jitter", "max_rotation", "scale_jitter", "max_slant", "max_blur",
              "max_noise", "max_margin", "digit_elastic"):
      if getattr(self, k) < 0:
        raise ValueError(f"config.data.{k} must be >= 0, got {getattr(self, k)}")
    if self.max_slant > 0.5:
      raise ValueError(f"config.data.max_slant must be <= 0.5, got {self.max_slant}")
    if self.digit_elastic > 4:
      raise ValueError(f"config.data.digit_elastic must be <= 4 pixels (more tears the 28x28 "
                       f"digits apart), got {self.digit_elastic}")

  def training_only(self, split: str) -> "Composition":
    """The composition of `split`'s lines: the digits' elastic distortion is a training
    augmentation, so validation and test lines show the digits as written."""
    return self if split == "train" else dataclasses.replace(self, digit_elastic=0.0)


def expected_width(num_digits: int, comp: Composition) -> float:
  """The mean natural width in pixels of a line of `num_digits` digits (before rounding up and
  before any shrinking): margins, digits at the mean height and MEAN_ASPECT, mean gaps."""
  mean_h = (comp.min_scale + comp.max_scale) / 2 * comp.height
  gap = (comp.min_gap + comp.max_gap) / 2 * mean_h
  return (comp.max_margin * comp.height + num_digits * MEAN_ASPECT * mean_h
          + (num_digits - 1) * gap)


def check_canvas(height: int, width: int, max_digits: int, *,
                 comp: Composition | None = None) -> None:
  """Raises ValueError, saying what to change, when max_digits digits cannot fit the width.

  Without `comp` it checks legibility only (each digit keeps about 5 pixels of width). With
  `comp`, the widest line must hold a line of max_digits digits of mean size and spacing
  (`expected_width`) shrunk no further than to the smallest digits the composition draws
  (min_scale, against the mean scale): lines wider than the widest bucket are shrunk to fit, and
  a typical longest line must not come out smaller than the data's own range.
  """
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
  if comp is None:
    return
  shrink = 2 * comp.min_scale / (comp.min_scale + comp.max_scale)  # The most a line may shrink.
  mean = expected_width(max_digits, comp)
  if width < mean * shrink:
    fits = max([0] + [n for n in range(1, max_digits) if expected_width(n, comp) * shrink <= width])

    def round_up(x):
      return WIDTH_MULTIPLE * math.ceil(x / WIDTH_MULTIPLE)

    raise ValueError(
        f"the widest line, {width} pixels (config.image_width = max(config.width_buckets)), "
        f"cannot hold the longest training line: {max_digits} digits at height {height} are "
        f"about {mean:.0f} pixels wide, and fitting them into {width} would draw them smaller "
        f"than config.data.min_scale; add a width bucket >= {round_up(mean)} (at least "
        f"{round_up(mean * shrink)}) and set config.image_width to it, or lower "
        f"config.max_digits to <= {fits}")


def _shift_filter(x: np.ndarray, fn) -> np.ndarray:
  """`fn` (np.maximum or np.minimum) over each 2x2 window of uint8 [h, w]: a morphological step
  of one pixel, half that of a 3x3 filter."""
  x = np.pad(x, ((0, 1), (0, 1)), mode="edge")
  return fn(fn(x[:-1, :-1], x[1:, :-1]), fn(x[:-1, 1:], x[1:, 1:]))


def _pen(img28: np.ndarray, stroke: int) -> Image.Image:
  """One 28x28 digit in a line's pen: 0 as drawn, -1 hairline, 1 thick, 2 heavy."""
  pil = Image.fromarray(img28)
  if stroke == 1:
    return pil.filter(ImageFilter.MaxFilter(3))
  if stroke == 2:  # 3x3 then 2x2: strokes 3 pixels wider, about twice an MNIST stroke.
    return Image.fromarray(_shift_filter(np.asarray(pil.filter(ImageFilter.MaxFilter(3))),
                                         np.maximum))
  if stroke == -1:
    # The thinnest stroke that stays readable: most MNIST strokes are 2-3 pixels wide, so a
    # 3x3 erosion wipes them out and a 2x2 one (a pixel off) leaves a hairline.
    total = float(img28.sum(dtype=np.float64))
    for thin in (np.asarray(pil.filter(ImageFilter.MinFilter(3))),
                 _shift_filter(img28, np.minimum)):
      if thin.sum(dtype=np.float64) >= 0.4 * total:
        return Image.fromarray(thin)
  return pil


def _distort(img28: np.ndarray, field: np.ndarray) -> np.ndarray:
  """uint8 [28, 28] moved by the smooth displacement field that `field` ([2, g, g] pixels,
  (dy, dx) on a g x g grid) interpolates."""
  size = img28.shape[0]
  dense = ndimage.zoom(field, (1, size / field.shape[1], size / field.shape[2]), order=1,
                       mode="nearest", grid_mode=True)
  rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
  moved = ndimage.map_coordinates(img28.astype(np.float32), (rows + dense[0], cols + dense[1]),
                                  order=1, mode="constant", cval=0.0)
  return np.uint8(np.clip(np.round(moved), 0, 255))


def _prepare_digit(img28: np.ndarray, stroke: int, angle: float, slant: float,
                   field: np.ndarray | None = None) -> Image.Image:
  """One 28x28 digit, elastically distorted by `field` (see `_distort`; None = as drawn), in
  the line's pen, rotated by `angle` degrees (counter-clockwise) and slanted, cropped to its
  ink."""
  if field is not None:
    img28 = _distort(img28, field)
  pil = _pen(img28, stroke)
  if angle or slant:
    # Forward map about the centre: rotate, then shear x += slant * (centre_y - y); PIL wants
    # the output -> input map, its inverse: rotate back after unshearing, (x, y) ->
    # R^-1 (x + slant * y, y), with y pointing down.
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    inv = ((c, c * slant - s), (s, s * slant + c))
    c_out, c_in = (_WORK - 1) / 2, 13.5
    pil = pil.transform(
        (_WORK, _WORK), Image.AFFINE,
        (inv[0][0], inv[0][1], c_in - c_out * (inv[0][0] + inv[0][1]),
         inv[1][0], inv[1][1], c_in - c_out * (inv[1][0] + inv[1][1])),
        resample=Image.BILINEAR, fillcolor=0)
  ink = np.asarray(pil) > 24  # The ink's box, ignoring faint fringes.
  cols, rows = np.flatnonzero(ink.any(axis=0)), np.flatnonzero(ink.any(axis=1))
  if not cols.size:
    return pil
  return pil.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


def compose_line(digit_images: np.ndarray, rng: np.random.Generator,
                 comp: Composition) -> tuple[np.ndarray, np.ndarray]:
  """Writes the given digits left to right on one line as wide as they need.

  Args:
    digit_images: uint8 [n, 28, 28], ink bright, in reading order (1 <= n <= max_digits).
    rng: the random generator (all randomness of the line comes from it).
    comp: the composition settings.

  Returns:
    image: uint8 [H, W, 1], ink bright on dark, with W a multiple of WIDTH_MULTIPLE in
      [WIDTH_MULTIPLE, comp.width].
    bboxes: float32 [n, 4], (ymin, xmin, ymax, xmax) of each digit, normalised by H and W.
  """
  n = len(digit_images)
  H, max_w = comp.height, comp.width
  # The line's style: everything one writer and one photograph share. A fixed number of draws
  # per line, so every line's randomness is easy to follow.
  style = rng.random(6)
  pen_u, align_u = style[0], style[1]
  slant = (2 * style[2] - 1) * comp.max_slant
  pen = (-1 if pen_u < comp.thin_prob else
         1 if pen_u < comp.thin_prob + comp.thicken_prob else
         2 if pen_u < comp.thin_prob + comp.thicken_prob + comp.heavy_prob else 0)
  angles = rng.uniform(-comp.max_rotation, comp.max_rotation, n)
  # Drawn only when on, so that lines without it are those of earlier versions.
  fields = (rng.normal(0, comp.digit_elastic, (n, 2, _ELASTIC_GRID, _ELASTIC_GRID))
            if comp.digit_elastic > 0 else [None] * n)
  crops = [_prepare_digit(d, pen, a, slant, f) for d, a, f in zip(digit_images, angles, fields)]

  line_h = rng.uniform(comp.min_scale, comp.max_scale) * H
  hs = np.minimum(line_h * (1 + rng.uniform(-comp.scale_jitter, comp.scale_jitter, n)), H)
  ws = np.array([max(c.width / c.height, _MIN_ASPECT) for c in crops]) * hs
  gaps = rng.uniform(comp.min_gap, comp.max_gap, max(n - 1, 0)) * line_h
  if n > 1:  # Overlap at most max_overlap of the narrower neighbour, so the order stays clear.
    gaps = np.maximum(gaps, -comp.max_overlap * np.minimum(ws[:-1], ws[1:]))
  margins = rng.uniform(0, comp.max_margin, 2) * H
  total = margins.sum() + ws.sum() + gaps.sum()
  if total > max_w:  # Shrink everything to fit the widest line.
    f = max_w / total
    hs, ws, gaps, margins, total = hs * f, ws * f, gaps * f, margins * f, total * f
  hs = np.maximum(hs, 1)
  W = min(max_w, max(WIDTH_MULTIPLE, WIDTH_MULTIPLE * math.ceil(total / WIDTH_MULTIPLE)))
  x = margins[0] + rng.uniform(0, max(W - total, 0))  # The rounding's slack, left or right.

  max_h = hs.max()
  if align_u < comp.bottom_prob:  # On a baseline.
    bottom = rng.uniform(max_h, H)
    tops = bottom - hs
  else:
    centre = rng.uniform(max_h / 2, H - max_h / 2)
    tops = centre - hs / 2
    if align_u >= comp.bottom_prob + comp.centre_prob:  # Jittered about the centre line.
      tops = tops + rng.uniform(-comp.vertical_jitter, comp.vertical_jitter, n) * H
  ink = (rng.uniform(comp.min_ink, 1.0, n) if style[3] < comp.faint_prob else np.ones(n))

  canvas = np.zeros((H, W), np.float32)
  bboxes = np.zeros((n, 4), np.float32)
  for i, crop in enumerate(crops):
    h = max(1, int(round(hs[i])))
    w = max(1, int(round(ws[i])))
    x0 = min(max(int(round(x)), 0), W - 1)
    w = min(w, W - x0)
    y0 = min(max(int(round(tops[i])), 0), H - h)
    patch = np.asarray(crop.resize((w, h), Image.BILINEAR), np.float32) * ink[i]
    region = canvas[y0:y0 + h, x0:x0 + w]
    np.maximum(region, patch, out=region)
    bboxes[i] = (y0 / H, x0 / W, (y0 + h) / H, (x0 + w) / W)
    x += ws[i] + (gaps[i] if i < n - 1 else 0)

  blurred = style[4] < comp.blur_prob and comp.max_blur > 0
  if blurred:
    radius = rng.uniform(min(0.3, comp.max_blur), comp.max_blur)
    canvas = np.asarray(Image.fromarray(np.uint8(np.round(canvas))).filter(
        ImageFilter.GaussianBlur(radius)), np.float32)
  noisy = style[5] < comp.noise_prob and comp.max_noise > 0
  if noisy:
    std = rng.uniform(min(0.01, comp.max_noise), comp.max_noise) * 255
    canvas = canvas + rng.normal(0, std, canvas.shape).astype(np.float32)
  # What predict does to a photographed line: ink stretched to peak 1 and, since a photograph
  # has blur and noise, everything fainter than INK_FLOOR cleared (the blur's faint skirt too).
  peak = canvas.max()
  if peak > 0:
    canvas = canvas * (255 / peak)
  if blurred or noisy:
    canvas[canvas < INK_FLOOR * 255] = 0
  image = np.uint8(np.round(np.clip(canvas, 0, 255)))
  return image[..., None], bboxes


def sample_line(digits, rng: np.random.Generator, comp: Composition):
  """Draws a length and digits from a DigitSet and composes them.

  Returns:
    (image uint8 [H, W, 1], bboxes float32 [n, 4], labels int32 [n], source ids int64 [n]).
  """
  n = int(rng.integers(1, comp.max_digits + 1))
  pick = rng.integers(0, len(digits), n)
  image, bboxes = compose_line(digits.images[pick], rng, comp)
  return image, bboxes, digits.labels[pick], digits.ids[pick]
