"""The `wild` and `long` evaluation splits: lines composed apart from the training generator.

The training lines (`compose.py`) and the `test` split share one generator, so a reader can be
excellent on `test` and still fail on a line a person wrote. These splits are drawn by a second,
independent code path with parameters of its own, from test-only digits (`sources.py`), and kept
as image files of their natural size, so that they are read through `predict`'s own
preprocessing: the figure is what a user gets.

- `wild`: 1-8 digits a line, at strengths beyond the training composition: digit heights that
  vary by up to +-30% within a line, neighbours that touch or overlap by up to 30% of a digit's
  width, bottom-, top-, centre-aligned or jittered digits, slant, strokes from hairline to
  heavy, blur, noise, low contrast, uneven lighting, JPEG artefacts, dark ink on light paper as
  often as light on dark, margins of any size, and digit heights from 14 to 110 pixels.
- `long`: 9-16 digits a line, composed by the same code at moderate strengths, so that it
  measures the length of a line rather than its style.

Each split is a folder `<root>/<split>-v<VERSION>-<hash>/` with one PNG a line and
`labels.csv` (`filename,digits,source_ids`, the ids space-separated, see `sources.py`); the hash covers everything that decides the images (the
style, the number of lines, the seed, the digit source), so distinct settings never share a
folder. Generation is deterministic: one numpy PCG64 stream per split, consumed in line order.
Lengths are balanced: line i has `lengths[i % len(lengths)]` digits.

  python -m digit_vit.data.wild --out=/tmp/wild_preview   # writes both splits and prints where
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
from typing import Sequence

import numpy as np
from absl import app, flags
from PIL import Image, ImageFilter

from digit_vit import cli
from digit_vit.data import sources

VERSION = 1
SPLITS = ("wild", "long")
LABELS_FILE = "labels.csv"


@dataclasses.dataclass(frozen=True)
class Style:
  """How the independent composer draws lines; every range is sampled uniformly.

  Attributes:
    lengths: the digit counts, cycled over the lines (balanced lengths).
    digit_height: (min, max) ink height of a line's digits in pixels, log-uniform.
    height_jitter: per-digit relative height variation within a line (+-).
    gap: (min, max) space between neighbours as a fraction of the narrower one's width;
      negative overlaps.
    slant: (min, max) horizontal shear of every digit (x += slant * (centre_y - y)).
    rotation: per-digit rotation in degrees (+-).
    alignments: vertical alignments drawn from: 'bottom', 'top', 'centre', 'jitter'.
    jitter: vertical offset for 'jitter' lines, fraction of the digit height (+-).
    stroke: (min, max) stroke width relative to the source digit's, drawn per line.
    margin: (min, max) margin on each side, as a fraction of the digit height.
    dark_ink_prob: probability of dark ink on light paper.
    contrast: (min, max) ink-minus-paper brightness, in (0, 1].
    blur: (min, max) Gaussian blur radius as a fraction of the stroke width.
    noise: (min, max) Gaussian pixel noise std (brightness in [0, 1]).
    lighting: (min, max) brightness ramp across the paper (0 = even).
    jpeg_prob: probability of a JPEG round trip at quality 30-80.
  """
  lengths: tuple[int, ...]
  digit_height: tuple[float, float] = (14.0, 110.0)
  height_jitter: float = 0.3
  gap: tuple[float, float] = (-0.3, 0.9)
  slant: tuple[float, float] = (-0.35, 0.35)
  rotation: float = 12.0
  alignments: tuple[str, ...] = ("bottom", "top", "centre", "jitter")
  jitter: float = 0.25
  stroke: tuple[float, float] = (0.55, 2.0)
  margin: tuple[float, float] = (0.0, 2.0)
  dark_ink_prob: float = 0.5
  contrast: tuple[float, float] = (0.35, 1.0)
  blur: tuple[float, float] = (0.0, 0.45)
  noise: tuple[float, float] = (0.0, 0.06)
  lighting: tuple[float, float] = (0.0, 0.25)
  jpeg_prob: float = 0.3


STYLES = {
    "wild": Style(lengths=tuple(range(1, 9))),
    "long": Style(lengths=tuple(range(9, 17)), digit_height=(18.0, 60.0), height_jitter=0.15,
                  gap=(-0.1, 0.6), slant=(-0.15, 0.15), rotation=6.0,
                  alignments=("centre", "bottom", "jitter"), jitter=0.1, stroke=(0.7, 1.6),
                  margin=(0.1, 1.0), contrast=(0.6, 1.0), blur=(0.0, 0.3),
                  noise=(0.0, 0.03), lighting=(0.0, 0.1), jpeg_prob=0.1),
}
# Lines a split holds by default: 125 (wild) and 50 (long) of each length.
DEFAULT_SIZES = {"wild": 1_000, "long": 400}
_STREAMS = {"wild": 7, "long": 8}


def _ink_crop(digit: np.ndarray) -> np.ndarray:
  """A 28x28 digit cropped to its ink (faint fringes ignored); [h, w] uint8."""
  rows, cols = np.nonzero(digit > 24)
  if rows.size == 0:
    return digit
  return digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _render_digit(digit: np.ndarray, height: float, rng: np.random.Generator, style: Style,
                  slant: float, stroke: float) -> np.ndarray:
  """One digit drawn at `height` pixels of ink, slanted, rotated and re-stroked.

  Returns:
    float32 [h, w] ink in [0, 1] (bright), cropped to its ink.
  """
  ink = Image.fromarray(_ink_crop(digit))
  # Work at 4x the source's resolution so shear, rotation and stroke changes stay smooth.
  ink = ink.resize((ink.width * 4, ink.height * 4), Image.BICUBIC)
  pad = ink.height
  canvas = Image.new("L", (ink.width + 2 * pad, ink.height + 2 * pad), 0)
  canvas.paste(ink, (pad, pad))
  angle = rng.uniform(-style.rotation, style.rotation)
  canvas = canvas.rotate(angle, resample=Image.BICUBIC)
  # Shear about the centre row: x_src = x + slant * (y - cy).
  cy = canvas.height / 2
  canvas = canvas.transform(canvas.size, Image.AFFINE, (1, slant, -slant * cy, 0, 1, 0),
                            resample=Image.BICUBIC)
  # The ink box of the digit as drawn, before its strokes change: a thinned digit keeps its size.
  box = canvas.point(lambda v: 255 if v > 40 else 0).getbbox() or (0, 0, *canvas.size)
  # MNIST strokes are about 10 pixels wide at 4x; a 3x3 filter pass moves each edge by one
  # pixel, so the stroke by about a fifth. Thinning stops before it erases the digit (it keeps
  # half of the ink at least), as a hairline pen still draws every stroke.
  passes = min(int(round(abs(np.log(stroke)) / np.log(1.2))), 8)
  ink_sum = np.asarray(canvas, np.float32).sum()
  for _ in range(passes):
    changed = canvas.filter(ImageFilter.MaxFilter(3) if stroke > 1 else ImageFilter.MinFilter(3))
    if stroke < 1 and np.asarray(changed, np.float32).sum() < 0.5 * ink_sum:
      break
    canvas = changed
  if stroke > 1:  # Thicker strokes reach past the box.
    grow = passes
    box = (max(box[0] - grow, 0), max(box[1] - grow, 0), min(box[2] + grow, canvas.width),
           min(box[3] + grow, canvas.height))
  canvas = canvas.crop(box)
  scale = height / canvas.height
  size = (max(1, round(canvas.width * scale)), max(1, round(height)))
  return np.asarray(canvas.resize(size, Image.LANCZOS), np.float32).clip(0, 255) / 255


def compose(digit_images: np.ndarray, rng: np.random.Generator, style: Style) -> np.ndarray:
  """Draws the digits left to right as one photograph-like line at its natural size.

  Args:
    digit_images: uint8 [n, 28, 28], ink bright, in reading order.
    rng: all randomness of the line comes from it.
    style: the composition's parameters.

  Returns:
    uint8 [H, W] greyscale; H and W follow from the digit height and the margins.
  """
  lo, hi = style.digit_height
  line_h = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
  slant = rng.uniform(*style.slant)
  stroke = float(np.exp(rng.uniform(np.log(style.stroke[0]), np.log(style.stroke[1]))))
  heights = line_h * (1 + rng.uniform(-style.height_jitter, style.height_jitter,
                                      len(digit_images)))
  glyphs = [_render_digit(d, h, rng, style, slant, stroke)
            for d, h in zip(digit_images, heights)]
  gaps = [rng.uniform(*style.gap) * min(a.shape[1], b.shape[1])
          for a, b in zip(glyphs[:-1], glyphs[1:])]
  xs = np.cumsum([0.0] + [g.shape[1] + gap for g, gap in zip(glyphs[:-1], gaps)])
  alignment = style.alignments[rng.integers(len(style.alignments))]
  tallest = max(g.shape[0] for g in glyphs)
  offsets = []
  for g in glyphs:
    free = tallest - g.shape[0]
    offset = {"bottom": free, "top": 0.0, "centre": free / 2}.get(
        alignment, free / 2 + rng.uniform(-style.jitter, style.jitter) * line_h)
    offsets.append(offset)
  top_extent = min(0.0, min(offsets))
  bottom_extent = max(o + g.shape[0] for o, g in zip(offsets, glyphs))
  margins = rng.uniform(*style.margin, 4) * line_h  # top, bottom, left, right
  x_min = min(0.0, float(xs.min()))
  width = xs[-1] + glyphs[-1].shape[1] - x_min
  out_h = int(np.ceil(bottom_extent - top_extent + margins[0] + margins[1])) + 1
  out_w = int(np.ceil(width + margins[2] + margins[3])) + 1
  ink = np.zeros((out_h, out_w), np.float32)
  for g, x, o in zip(glyphs, xs, offsets):
    y0 = int(round(o - top_extent + margins[0]))
    x0 = int(round(x - x_min + margins[2]))
    region = ink[y0:y0 + g.shape[0], x0:x0 + g.shape[1]]
    np.maximum(region, g[:region.shape[0], :region.shape[1]], out=region)

  # Blur relative to the stroke (about an eighth of the digit height), so it softens the
  # strokes without erasing them.
  blur = rng.uniform(*style.blur) * 0.12 * line_h * stroke
  if blur > 0.3:
    blurred = Image.fromarray(np.uint8(np.round(ink * 255))).filter(
        ImageFilter.GaussianBlur(blur))
    ink = np.asarray(blurred, np.float32) / 255
  contrast = rng.uniform(*style.contrast)
  dark_ink = rng.random() < style.dark_ink_prob
  paper = rng.uniform(0.75, 1.0) if dark_ink else rng.uniform(0.0, 0.2)
  ramp = rng.uniform(*style.lighting) * np.linspace(-0.5, 0.5, out_w)[None, :]
  if rng.random() < 0.5:
    ramp = ramp[:, ::-1]
  sign = -1.0 if dark_ink else 1.0
  page = paper + ramp + sign * contrast * ink
  page = page + rng.normal(0.0, rng.uniform(*style.noise), page.shape)
  image = Image.fromarray(np.uint8(np.round(np.clip(page, 0, 1) * 255)))
  if rng.random() < style.jpeg_prob:
    buf = io.BytesIO()
    image.save(buf, format="jpeg", quality=int(rng.integers(30, 81)))
    image = Image.open(io.BytesIO(buf.getvalue())).convert("L")
  return np.asarray(image, np.uint8)


def split_name(split: str, size: int, seed: int, source: str) -> str:
  """The folder of a split: `wild-v1-<hash of everything that decides its images>`."""
  key = json.dumps({"style": dataclasses.asdict(STYLES[split]), "size": size, "seed": seed,
                    "source": source, "version": VERSION}, sort_keys=True)
  return f"{split}-v{VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _check_split(split: str) -> None:
  if split not in STYLES:
    raise ValueError(f"unknown evaluation split {split!r}; choose among {', '.join(SPLITS)}")


def generate(split: str, digits: sources.DigitSet, size: int, seed: int):
  """(image uint8 [H, W], digit string, source ids int64 [n]) for each line of `split`,
  deterministic."""
  _check_split(split)
  style = STYLES[split]
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _STREAMS[split],
                                                                     0x77696C64])))
  for i in range(size):
    n = style.lengths[i % len(style.lengths)]
    pick = rng.integers(0, len(digits), n)
    text = "".join(str(int(d)) for d in digits.labels[pick])
    yield compose(digits.images[pick], rng, style), text, digits.ids[pick]


def build(split: str, root: str | os.PathLike, *, source: str = "embedded",
          source_dir: str = "", size: int | None = None, seed: int = 0,
          validation_per_class: int = 40) -> pathlib.Path:
  """Writes `split` under `root` unless it is there already; returns its folder.

  The digits are the source's test digits (for 'embedded': rows 400-499 of each class), which
  reach neither training nor validation. The folder appears under its final name only once
  complete, so an interrupted build is redone.
  """
  _check_split(split)
  size = DEFAULT_SIZES[split] if size is None else int(size)
  if size < 1:
    raise ValueError(f"an evaluation split needs at least one line, got size={size}")
  folder = pathlib.Path(root) / split_name(split, size, seed, source)
  if (folder / LABELS_FILE).exists():
    return folder
  digits = sources.load_digits(source, "test", validation_per_class=validation_per_class,
                               source_dir=source_dir)
  partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
  partial.mkdir(parents=True, exist_ok=True)
  rows = []
  for i, (image, text, ids) in enumerate(generate(split, digits, size, seed)):
    name = f"{i:05d}.png"
    Image.fromarray(image).save(partial / name, compress_level=1)
    rows.append((name, text, " ".join(str(int(j)) for j in ids)))
  with open(partial / LABELS_FILE, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["filename", "digits", "source_ids"])
    writer.writerows(rows)
  try:
    partial.rename(folder)
  except OSError:  # Another process finished the same split first: keep theirs.
    if not (folder / LABELS_FILE).exists():
      raise
  return folder


def load_labels(folder: str | os.PathLike) -> list[tuple[pathlib.Path, str]]:
  """(image path, digits) of each line of a built split, in order."""
  folder = pathlib.Path(folder)
  with open(folder / LABELS_FILE, newline="") as f:
    return [(folder / row["filename"], row["digits"]) for row in csv.DictReader(f)]


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global."""
  flags.DEFINE_string("out", None, "Root folder for the splits.", required=True,
                      flag_values=flag_values)
  flags.DEFINE_string("splits", ",".join(SPLITS), "Comma-separated splits to write.",
                      flag_values=flag_values)
  flags.DEFINE_integer("size", None, "Lines a split (default: "
                       + ", ".join(f"{k} {v}" for k, v in DEFAULT_SIZES.items()) + ").",
                       flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "The seed of the splits' random stream.",
                       flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> int:
  if len(argv) > 1:
    return cli.error(f"unexpected arguments {argv[1:]}", cli.USAGE)
  for split in flag_values.splits.split(","):
    try:
      print(build(split, flag_values.out, size=flag_values.size, seed=flag_values.seed))
    except ValueError as e:
      return cli.error(str(e), cli.USAGE)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
