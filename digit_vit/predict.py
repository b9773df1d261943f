r"""Reads digits from image files with a trained model.

  python -m digit_vit.predict --workdir=runs/default IMAGE_OR_DIR... \
      [--output=readings.csv] [--attention=maps/] [--beam_size=4] [--views=5] \
      [--ensemble=RUN[@CHECKPOINT],...]

Any image Pillow opens (PNG, JPEG, BMP, ...) of any size, grey or colour, light ink on a dark
background or dark ink on light paper: `to_canvas` detects the polarity, crops to the ink and
fits it into the model's canvas, keeping its aspect ratio, at the height the training lines
have. Each file prints its raw tokens, its digits and the confidence (the probability of the
reading under the model). A file that cannot be read is reported by name on stderr, the others
are still read, and the exit status is 1. All images go through one compiled decoder at a
fixed batch shape, whatever their number or size.

The same from Python:

  reader = predict.Reader("runs/default")
  [p.digits for p in reader.read([image_array, pil_image])]
  predict.read_files(reader, ["a.png", "b.jpg"])
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import pathlib
import sys
from typing import BinaryIO, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from scipy import ndimage

from digit_vit import decode, logs, trained, xla_options
from digit_vit.models import tokens
from digit_vit.models.reader import DigitReader, ModelConfig

# Files a directory argument contributes (others in it are ignored).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Larger images are refused before decoding (a 50-megapixel photo is far more than a line of
# digits needs, and decoding one costs a few hundred MB).
MAX_PIXELS = 50_000_000

# Where the training lines put their ink (digit_vit/data/compose.py): line heights are drawn
# from 0.55-0.9 of the canvas height, so an input line is fitted to the middle of that range.
LINE_HEIGHT = 0.72
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
      max_digits + 1 of them.
    digits: the digits read; '' for an image with no ink.
    confidence: the probability of the reading under the model, exp(log_prob), in [0, 1].
    log_prob: the sum of the log-probabilities of the tokens up to `<eos>`.
    no_ink: the image had no ink, so the model was not run.
    canvas: float32 [H, W] the model input in [0, 1], ink bright (None on error).
    attention: float32 [n, H, W] for the n tokens up to and including `<eos>`: the decoder's
      cross-attention over the image while it wrote each one (when asked for).
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
    ImageError: missing file, not an image, or too large; the message names the source.
  """
  name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "upload"
  data = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  try:
    with Image.open(data) as image:
      if image.width * image.height > max_pixels:
        raise ImageError(f"{name}: {image.width}x{image.height} pixels is more than the "
                         f"{max_pixels:,} accepted; crop or downscale it")
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
  float32 in [0, 1]."""
  if isinstance(image, Image.Image):
    return _to_grey(image).astype(np.float32) / 255
  x = np.asarray(image)
  if x.ndim == 3 and x.shape[-1] in (1, 3, 4):
    x = x[..., 0] if x.shape[-1] == 1 else x[..., :3] @ np.array([0.299, 0.587, 0.114])
  if x.ndim != 2:
    raise ImageError(f"an image array must be [H, W] or [H, W, 1|3|4], got shape {x.shape}")
  x = x.astype(np.float32)
  return x / 255 if np.issubdtype(np.asarray(image).dtype, np.integer) or x.max() > 1 else x


def to_canvas(image: np.ndarray | Image.Image, height: int, width: int) -> np.ndarray | None:
  """Normalises an image of a line of digits into the model's canvas.

  Ink is made bright on black (the polarity is the opposite of the median pixel, since ink
  covers a minority of the image), stretched to peak 1, cropped to its bounding box, thickened
  if its strokes would end up thinner than the training digits', and scaled to the training
  lines' height (narrower if the line would not fit the width, never distorted), centred.

  Args:
    image: see `as_grey_array`.
    height, width: the canvas.

  Returns:
    float32 [height, width] in [0, 1], or None when the image has no ink.
  """
  x = as_grey_array(image)
  background = float(np.median(x))
  if background > 0.5:
    x, background = 1.0 - x, 1.0 - background
  x = x - background
  peak = float(x.max()) if x.size else 0.0
  if peak < MIN_INK_CONTRAST:
    return None
  x = np.clip(x / peak, 0.0, 1.0)
  x[x < INK_FLOOR] = 0.0
  rows, cols = np.nonzero(x >= INK_THRESHOLD)
  x = x[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  scale = min(LINE_HEIGHT * height / x.shape[0], (width - 2) / x.shape[1])
  x = _thicken(x, scale)
  out_h = max(1, min(height, round(x.shape[0] * scale)))
  out_w = max(1, min(width, round(x.shape[1] * scale)))
  # Pillow's bilinear resize is antialiased when shrinking, like the training composition.
  fitted = Image.fromarray(np.uint8(np.round(x * 255))).resize((out_w, out_h), Image.BILINEAR)
  canvas = np.zeros((height, width), np.float32)
  top, left = (height - out_h) // 2, (width - out_w) // 2
  canvas[top:top + out_h, left:left + out_w] = np.asarray(fitted, np.float32) / 255
  return canvas


def stroke_width(ink: np.ndarray) -> float:
  """Mean stroke width in pixels of a bright-ink image: area / half the perimeter (a stroke
  of length L and width w has area L w and perimeter about 2 L)."""
  mask = ink >= INK_THRESHOLD
  boundary = mask & ~ndimage.binary_erosion(mask)
  return 2.0 * mask.sum() / max(int(boundary.sum()), 1)


def _thicken(ink: np.ndarray, scale: float) -> np.ndarray:
  width = stroke_width(ink)
  if width * scale >= STROKE_WIDTH - 0.5:
    return ink
  grow = int(np.ceil(STROKE_WIDTH / scale - width))
  return ndimage.grey_dilation(ink, size=(grow + 1, grow + 1))


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
    self.config = load_config(workdir)
    self.model_config = ModelConfig.from_config(self.config.model)
    readers, self.ensemble = trained.restore_ensemble(self.config, ensemble)
    self._ensemble_configs = tuple(c for c, _ in readers)
    self._ensemble_params = tuple(p for _, p in readers)
    self.params, self.step = trained.restore_params(workdir, self.config, checkpoint)
    self.beam_size, self.alpha, self.views = trained.decoding(self.config, beam_size, alpha,
                                                              views)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = batch_size
    self.height, self.width = self.model_config.image_height, self.model_config.image_width
    self.traces = 0  # Compilations of the reading function (tests check there is one).
    self._read_batch = xla_options.jit(self._read_fn)

  def _read_fn(self, params, ensemble_params, images):
    self.traces += 1
    # A lone model is an ensemble of one to `decode`.
    outputs, log_prob = decode.decode((self.model_config, *self._ensemble_configs),
                                      (params, *ensemble_params), images,
                                      beam_size=self.beam_size, alpha=self.alpha,
                                      views=self.views)
    return outputs, log_prob, cross_attention(self.model_config, params, images, outputs)

  def read(self, images: Sequence[np.ndarray | Image.Image], *, attention: bool = False,
           filenames: Sequence[str] | None = None) -> list[Prediction]:
    """Reads each image (see `to_canvas` for what is accepted).

    Args:
      images: arrays or PIL images of any size.
      attention: fill `Prediction.attention`.
      filenames: names to put in the predictions.
    """
    filenames = list(filenames) if filenames is not None else [""] * len(images)
    canvases = [to_canvas(image, self.height, self.width) for image in images]
    inked = [i for i, c in enumerate(canvases) if c is not None]
    predictions = [_no_ink(name, self.height, self.width, self.model_config.max_length)
                   for name in filenames]
    for start in range(0, len(inked), self.batch_size):
      rows = inked[start:start + self.batch_size]
      batch = np.zeros((self.batch_size, self.height, self.width, 1), np.float32)
      batch[:len(rows), ..., 0] = [canvases[i] for i in rows]
      outputs, log_prob, weights = jax.device_get(
          self._read_batch(self.params, self._ensemble_params, batch))
      for j, i in enumerate(rows):
        predictions[i] = _prediction(filenames[i], outputs[j], float(log_prob[j]), canvases[i],
                                     weights[j] if attention else None, self.model_config)
    return predictions


def cross_attention(model_config: ModelConfig, params, images, outputs):
  """Where the decoder looked while writing each output token.

  Re-runs the decoder teacher-forced on its own outputs and averages the cross-attention
  weights over heads and blocks.

  Args:
    images: float [batch, H, W, C].
    outputs: int32 [batch, length] raw outputs (no `<sos>`).

  Returns:
    float32 [batch, length, H, W]: each output token's attention spread over its patches'
    pixels (a token's map sums to 1 over the patches).
  """
  model = DigitReader(model_config)
  inputs = jnp.concatenate([jnp.full_like(outputs[:, :1], tokens.SOS), outputs[:, :-1]], 1)
  memory = model.apply({"params": params}, images, method=DigitReader.encode)
  _, weights = model.apply({"params": params}, inputs, memory, return_weights=True,
                           method=DigitReader.decode_tokens)
  weights = jnp.mean(jnp.stack(weights), axis=(0, 2))  # [batch, length, patches]
  rows, cols = model_config.grid
  patch_h, patch_w = model_config.patch_size
  grid = weights.reshape(weights.shape[:2] + (rows, cols))
  return jnp.repeat(jnp.repeat(grid, patch_h, axis=2), patch_w, axis=3)


def _prediction(filename, outputs, log_prob, canvas, attention, model_config) -> Prediction:
  reading = tokens.read_output(outputs)
  # The map of each token up to and including <eos> (or all, for an output that never ended).
  shown = len(reading.digits) + 1 if reading.ended else model_config.max_length
  return Prediction(filename=filename, tokens=[int(t) for t in outputs], digits=reading.digits,
                    confidence=float(np.exp(log_prob)), log_prob=log_prob, canvas=canvas,
                    attention=None if attention is None else np.asarray(attention[:shown]))


def _no_ink(filename: str, height: int, width: int, max_length: int) -> Prediction:
  return Prediction(filename=filename, tokens=[tokens.EOS] + [tokens.PAD] * (max_length - 1),
                    digits="", confidence=1.0, log_prob=0.0, no_ink=True,
                    canvas=np.zeros((height, width), np.float32))


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


def read_files(reader: Reader, arguments: Iterable[str], *,
               attention: bool = False) -> list[Prediction]:
  """Reads files and directories (see `expand_paths`); a file that cannot be read gets a
  Prediction with `error` set, and the others are still read."""
  names, images, failed = [], [], {}
  for name, path in expand_paths(arguments):
    try:
      images.append(load_image(path))
      names.append(name)
    except ImageError as e:
      failed[name] = str(e)
  read = iter(reader.read(images, attention=attention, filenames=names))
  # Keep the order of the arguments, failures in their place.
  return [Prediction(filename=name, error=failed[name]) if name in failed else next(read)
          for name, _ in expand_paths(arguments)]


def write_csv(predictions: Sequence[Prediction], path: str | os.PathLike) -> None:
  """Rows `filename,digits,confidence` (with that header) for the files that were read."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["filename", "digits", "confidence"])
    for p in predictions:
      if p.error is None:
        writer.writerow([p.filename, p.digits, f"{p.confidence:.6f}"])


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
  flags.DEFINE_string("output", None, "Write rows filename,digits,confidence to this CSV file.")
  flags.DEFINE_string("attention", None, "Write each image's attention maps as PNG under this "
                      "directory.")
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
  """`name  digits=101  confidence=0.9873  tokens=[1, 0, 1, 11, 12, ...]`."""
  note = "  (no ink)" if p.no_ink else ""
  return (f"{p.filename}  digits={p.digits or '-'}  confidence={p.confidence:.4f}  "
          f"tokens={p.tokens}{note}")


def run(reader: Reader, arguments: Sequence[str], *, output: str | None = None,
        attention_dir: str | None = None) -> list[Prediction]:
  """The command: reads, prints, writes the CSV and the maps; returns the predictions."""
  predictions = read_files(reader, arguments, attention=attention_dir is not None)
  for p in predictions:
    if p.error is not None:
      print(f"error: {p.error}", file=sys.stderr)
      continue
    print(format_prediction(p))
    if attention_dir is not None and not p.no_ink:
      path = attention_path(attention_dir, p.filename)
      path.parent.mkdir(parents=True, exist_ok=True)
      attention_overlay(p).save(path)
  if output:
    write_csv(predictions, output)
  return predictions


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give one or more image files or directories to read")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: a training run's directory")
  logs.quiet_libraries()
  try:
    checkpoint = trained.parse_checkpoint(FLAGS.checkpoint)
  except ValueError as e:
    raise app.UsageError(f"--checkpoint={e}") from None
  try:
    reader = Reader(FLAGS.workdir, checkpoint=checkpoint, beam_size=FLAGS.beam_size,
                    alpha=FLAGS.alpha, views=FLAGS.views, batch_size=FLAGS.batch_size,
                    ensemble=FLAGS.ensemble)
  except (ValueError, FileNotFoundError) as e:  # A wrong run, checkpoint or decoding setting.
    raise app.UsageError(str(e)) from None
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
