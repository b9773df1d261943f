r"""Reads digits from image files with a trained model.

  python -m digit_vit.predict --workdir=runs/default IMAGE_OR_DIR... \
      [--output=readings.csv] [--attention=maps/] [--beam_size=4] [--views=5] \
      [--ensemble=RUN[@CHECKPOINT],...]
  python -m digit_vit.predict --model=EXPORTED_DIR IMAGE_OR_DIR... [--output=...] [--attention=...]
  python -m digit_vit.predict IMAGE_OR_DIR...      # the released reader, release/reader

`--model` reads with an exported reader (`python -m digit_vit.export`, loaded by
`digit_vit.serving`) instead of a training run: the decoding was fixed when it was exported, so
--checkpoint, --beam_size, --alpha, --views and --ensemble apply to --workdir only. With neither
`--workdir` nor `--model` it reads with the released reader (`release/reader` of the repository,
whatever the working directory; `$DIGIT_VIT_READER` points elsewhere: `serving.default_reader`),
and without one says how to get a reader (train one, or `make release`): a usage error.

Any image Pillow opens (PNG, JPEG, BMP, ...) of any size, grey or colour, light ink on a dark
background or dark ink on light paper: `to_canvas` detects the polarity, crops to the ink and
fits it into the model's canvas, keeping its aspect ratio, at the height the training lines
have. Each image costs bounded work: one that is too large (`MAX_PIXELS`) or too elongated to
hold a readable line (`MAX_ASPECT_RATIO`) is refused before it is decoded, and a line far larger
than the canvas is measured and thickened at a working resolution (`WORKING_SCALE`).

Each file prints its raw tokens, its digits and the confidence (the probability of the reading
under the model, calibrated by the temperature the run fitted on its validation split,
`calibration`); a reading that reached the decoder's maximum length without `<eos>` is marked
`(truncated: ...)`, with a warning on stderr, since the line may hold more digits.
`--min_confidence=X` (in [0, 1]) marks a reading below X `(rejected: ...)`: still printed and
written, for the caller to set aside; rejections alone leave the exit status 0. A file that
cannot be read is reported by name on stderr, the others are still read, and the exit status is
1. Files are loaded one at a time and read a batch at a time, so memory holds one image and the
small canvases, whatever the number of files. All images go through one compiled decoder at a
fixed batch shape, whatever their number or size. `--output` writes the CSV
`filename,digits,confidence,truncated,rejected`. A mistake on the command line (a missing or
wrong `--workdir`, an `--output` or `--attention` that cannot be written, a `--min_confidence`
outside [0, 1]) is one line on stderr and exit status 2, found before the model is loaded or
any image read.

The same from Python:

  reader = predict.Reader("runs/default")
  [p.digits for p in reader.read([image_array, pil_image])]
  predict.read_files(reader, ["a.png", "b.jpg"])
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import pathlib
import sys
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from digit_vit import calibration, cli, decode, logs, trained, xla_options
# The image preprocessing lives in `preprocess`, shared with `serving`.
from digit_vit.preprocess import WIDTH_MULTIPLE, ImageError, load_image, to_canvas
from digit_vit.data import buckets
from digit_vit.models import tokens
from digit_vit.models.reader import DigitReader, ModelConfig, patch_mask

# Files a directory argument contributes (others in it are ignored).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class Prediction:
  """One image's reading.

  Attributes:
    filename: the name it was given under ('' for in-memory images).
    tokens: raw decoder outputs without `<sos>`, e.g. [1, 0, 1, 11, 12, ...] for "101";
      the decoder's maximum length (`ModelConfig.max_length`) of them.
    digits: the digits read; '' for an image with no ink.
    confidence: the probability of the reading under the model, exp(log_prob), in [0, 1],
      calibrated by the run's temperature (`calibration`): of readings at confidence 0.9,
      about 9 in 10 are exactly right, as measured on the validation split.
    log_prob: the sum of the (calibrated) log-probabilities of the tokens up to `<eos>`.
    token_probs: each written token's calibrated probability, the decoder's maximum length of
      them, 1 after `<eos>`: their product is `confidence`.
    rejected: confidence below the reader's `min_confidence`: a reading not to act on.
    no_ink: the image had no ink, so the model was not run.
    canvas: float32 [H, W] the model input in [0, 1], ink bright (None on error).
    attention: float32 [n, H, W] for the n tokens up to and including `<eos>`: the decoder's
      cross-attention over the image while it wrote each one (when asked for).
    truncated: the decoder reached its maximum length without writing `<eos>`, so the line
      may hold more digits than `digits` has.
    error: why the file could not be read (then the other fields are empty).
    step_log_probs: float32 [max_length, vocab] the untempered distributions the tokens were
      picked from (0 after `<eos>`; None with no ink): what `calibration` needs to fit or
      apply another temperature without reading again.
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
  token_probs: list[float] = dataclasses.field(default_factory=list)
  rejected: bool = False
  step_log_probs: np.ndarray | None = dataclasses.field(default=None, repr=False)


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
    temperature: calibrates the confidence (`decode.decode`); default: the run's
      (`calibration.load_temperature`, 1.0 if it has none), or 1.0 with an `ensemble`, whose
      mean probability the run's temperature was not fitted to.
    min_confidence: readings below it are marked `rejected` (0: none is).
  """

  def __init__(self, workdir: str | os.PathLike, *, checkpoint: str | int = "best",
               beam_size: int | None = None, alpha: float | None = None,
               views: int | None = None, batch_size: int = 16,
               ensemble: Sequence[str | os.PathLike] = (), temperature: float | None = None,
               min_confidence: float = 0.0):
    config = load_config(workdir)
    readers, described = trained.restore_ensemble(config, ensemble)
    params, step = trained.restore_params(workdir, config, checkpoint)
    if temperature is None:
      temperature = 1.0 if ensemble else calibration.load_temperature(workdir)
    self._setup(config, params, step, readers, described, beam_size=beam_size, alpha=alpha,
                views=views, batch_size=batch_size, temperature=temperature,
                min_confidence=min_confidence)

  @classmethod
  def from_params(cls, config: ml_collections.ConfigDict, params, *, step: int = 0,
                  beam_size: int | None = None, alpha: float | None = None,
                  views: int | None = None, batch_size: int = 16, ensemble=(),
                  described=(), temperature: float = 1.0,
                  min_confidence: float = 0.0) -> "Reader":
    """A reader of parameters in hand (a run's config and its model's params), as training
    and `evaluate` read the file splits (`file_evaluation`); `ensemble` and `described` as
    `trained.restore_ensemble` returns them."""
    reader = cls.__new__(cls)
    reader._setup(config, params, step, ensemble, list(described), beam_size=beam_size,
                  alpha=alpha, views=views, batch_size=batch_size, temperature=temperature,
                  min_confidence=min_confidence)
    return reader

  def _setup(self, config, params, step, readers, described, *, beam_size, alpha, views,
             batch_size, temperature, min_confidence):
    if not (math.isfinite(temperature) and temperature > 0):
      raise ValueError(f"temperature must be positive and finite, got {temperature}")
    self.temperature = float(temperature)
    self.min_confidence = check_min_confidence(min_confidence)
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
    # The decoder, the CTC head's columns, or both (and their weights).
    self.reader_options = trained.reader_options(self.config)
    self.traces = 0  # Compilations of the reading function: one per width bucket used.
    matmul_dtype = self.model_config.matmul_dtype
    self._read_batch = xla_options.jit(self._read_fn, matmul_dtype=matmul_dtype)
    self._attention_batch = xla_options.jit(
        functools.partial(cross_attention, self.model_config), matmul_dtype=matmul_dtype)

  def _read_fn(self, params, ensemble_params, images, widths):
    self.traces += 1
    # A lone model is an ensemble of one to `decode`.
    return decode.decode((self.model_config, *self._ensemble_configs),
                         (params, *ensemble_params), images, widths=widths,
                         beam_size=self.beam_size, alpha=self.alpha, views=self.views,
                         max_length=self.max_length, temperature=self.temperature,
                         token_log_probs=True, step_log_probs=True,
                         **self.reader_options)

  def prepare(self, images: Sequence[np.ndarray | Image.Image]) -> list[np.ndarray | None]:
    """The model inputs of `images` (see `to_canvas`): float32 [H, w] each, w a multiple of 8
    up to the widest bucket, None for no ink.

    Pure numpy and Pillow: a server runs it outside the lock that guards the model."""
    return [to_canvas(image, self.height, self.width) for image in images]

  def read(self, images: Sequence[np.ndarray | Image.Image], *, attention: bool = False,
           filenames: Sequence[str] | None = None,
           min_confidence: float | None = None) -> list[Prediction]:
    """Reads each image (see `to_canvas` for what is accepted).

    Args:
      images: arrays or PIL images of any size.
      attention: fill `Prediction.attention` (an extra teacher-forced pass).
      filenames: names to put in the predictions.
      min_confidence: readings below it are `rejected` (default: the reader's).
    """
    return self.read_prepared(self.prepare(images), attention=attention, filenames=filenames,
                              min_confidence=min_confidence)

  def read_prepared(self, canvases: Sequence[np.ndarray | None], *, attention: bool = False,
                    filenames: Sequence[str] | None = None,
                    min_confidence: float | None = None) -> list[Prediction]:
    """Reads what `prepare` made (None: an image with no ink); see `read`.

    Lines are read in batches of `batch_size` of one width bucket each (the narrowest that
    holds them), padded on the right with background, so the decoder compiles once a bucket.
    """
    threshold = (self.min_confidence if min_confidence is None
                 else check_min_confidence(min_confidence))
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
        outputs, log_prob, per_token, dists = self._read_batch(
            self.params, self._ensemble_params, batch, widths)
        weights = (self._attention_batch(self.params, batch, widths, outputs) if attention
                   else None)
        outputs, log_prob, per_token, dists, weights = jax.device_get(
            (outputs, log_prob, per_token, dists, weights))
        for j, i in enumerate(rows):
          maps = None if weights is None else weights[j, :, :, :canvases[i].shape[1]]
          predictions[i] = _prediction(filenames[i], outputs[j], float(log_prob[j]),
                                       canvases[i], maps, token_log_probs=per_token[j],
                                       step_log_probs=dists[j])
    for p in predictions:
      p.rejected = p.confidence < threshold
    return predictions


def check_min_confidence(value: float) -> float:
  """`value` as a float if it is a probability (in [0, 1]); else ValueError."""
  value = float(value)
  if not 0.0 <= value <= 1.0:  # NaN fails too.
    raise ValueError(f"min_confidence must be in [0, 1], got {value}")
  return value


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


def _prediction(filename, outputs, log_prob, canvas, attention, *, token_log_probs=None,
                step_log_probs=None) -> Prediction:
  """The Prediction of one image from its raw outputs [max_length] (no `<sos>`), the sum of
  their (calibrated) log-probabilities, its canvas and its maps [max_length, H, W] (or None);
  token_log_probs [max_length] and step_log_probs [max_length, vocab] as `decode` gives them."""
  reading = tokens.read_output(outputs)
  # The map of each token up to and including <eos> (or all, for an output that never ended).
  shown = len(reading.digits) + 1 if reading.ended else len(outputs)
  return Prediction(filename=filename, tokens=[int(t) for t in outputs], digits=reading.digits,
                    confidence=float(np.exp(log_prob)), log_prob=log_prob, canvas=canvas,
                    attention=None if attention is None else np.asarray(attention[:shown]),
                    truncated=not reading.ended,
                    token_probs=([] if token_log_probs is None
                                 else [float(x) for x in np.exp(token_log_probs)]),
                    step_log_probs=step_log_probs)


def _no_ink(filename: str, height: int, max_length: int) -> Prediction:
  return Prediction(filename=filename, tokens=[tokens.EOS] + [tokens.PAD] * (max_length - 1),
                    digits="", confidence=1.0, log_prob=0.0, no_ink=True,
                    canvas=np.zeros((height, WIDTH_MULTIPLE), np.float32),
                    token_probs=[1.0] * max_length)


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
  """Rows `filename,digits,confidence,truncated,rejected` (with that header; truncated: `true`
  for a reading that reached the decoder's maximum length without `<eos>`, else `false`;
  rejected: `true` for a confidence below `--min_confidence`) for the files that were read."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["filename", "digits", "confidence", "truncated", "rejected"])
    for p in predictions:
      if p.error is None:
        writer.writerow([p.filename, p.digits, f"{p.confidence:.6f}",
                         "true" if p.truncated else "false",
                         "true" if p.rejected else "false"])


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


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global."""
  cli.define_reader_flags(flag_values, min_confidence=True)
  flags.DEFINE_string("output", None, "Write rows filename,digits,confidence,truncated,rejected "
                      "to this CSV file (its directory must exist).", flag_values=flag_values)
  flags.DEFINE_string("attention", None, "Write each image's attention maps as PNG under this "
                      "directory (made if missing).", flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 16, "Images per call of the compiled decoder.",
                       flag_values=flag_values)


def format_prediction(p: Prediction, min_confidence: float | None = None) -> str:
  """`name  digits=101  confidence=0.9873  tokens=[1, 0, 1, 11, 12, ...]`, then `(no ink)`, or
  `(truncated: no <eos> within N tokens)` for a reading that reached the decoder's maximum,
  and `(rejected: confidence below X)` for one marked rejected (X = `min_confidence`)."""
  note = "  (no ink)" if p.no_ink else ""
  if p.truncated:
    note = f"  (truncated: no <eos> within {len(p.tokens)} tokens)"
  if getattr(p, "rejected", False):
    below = "" if min_confidence is None else f" {min_confidence:g}"
    note += f"  (rejected: confidence below{below})"
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
        attention_dir: str | None = None,
        min_confidence: float | None = None) -> list[Prediction]:
  """The command: reads, printing each file's reading as its batch is read (and a warning on
  stderr for a truncated one), writes the maps and then the CSV; returns the predictions,
  without the attention maps it wrote. With `min_confidence`, a reading below it is marked
  `rejected` (whatever reader read it: a run's or an exported one), else the reader's mark
  stands."""
  predictions = []
  for p in iter_read_files(reader, arguments, attention=attention_dir is not None):
    predictions.append(p)
    if p.error is not None:
      print(f"error: {p.error}", file=sys.stderr)
      continue
    if min_confidence is not None:
      p.rejected = p.confidence < min_confidence
    print(format_prediction(p, min_confidence), flush=True)
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


def main(argv):
  if len(argv) < 2:
    return cli.error("give one or more image files or directories to read (--helpshort "
                     "lists the flags)", cli.USAGE)
  try:
    workdir, model = reader_source(FLAGS.workdir, FLAGS.model)
  except ValueError as e:  # Both, or neither and no released reader.
    return cli.error(str(e), cli.USAGE)
  problem = check_output_paths(FLAGS.output, FLAGS.attention) or _run_only_flags(model)
  if problem:
    return cli.error(problem, cli.USAGE)
  logs.quiet_libraries()
  if model:
    try:
      reader = _load_exported(model, batch_size=FLAGS.batch_size)
    except ValueError as e:  # Not an export, another format version, a damaged file.
      return cli.error(str(e), cli.USAGE)
    return _finish(run(reader, argv[1:], output=FLAGS.output, attention_dir=FLAGS.attention,
                       min_confidence=FLAGS.min_confidence))
  try:
    reader = Reader(workdir, checkpoint=FLAGS.checkpoint, beam_size=FLAGS.beam_size,
                    alpha=FLAGS.alpha, views=FLAGS.views, batch_size=FLAGS.batch_size,
                    ensemble=FLAGS.ensemble)
  except (ValueError, FileNotFoundError) as e:  # A wrong run, checkpoint or decoding setting.
    return cli.error(str(e), cli.USAGE)
  return _finish(run(reader, argv[1:], output=FLAGS.output, attention_dir=FLAGS.attention,
                     min_confidence=FLAGS.min_confidence))


def reader_source(workdir: str | None, model: str | None) -> tuple[str | None, str | None]:
  """(workdir, model): what a command reads with, one of them set.

  The one given; with neither, the released reader (`serving.find_default_reader`:
  release/reader of the repository, or $DIGIT_VIT_READER) as `model`.

  Raises:
    ValueError: both given, or neither and no released reader (the message says how to get
      one); a usage error.
  """
  from digit_vit import serving  # pylint: disable=import-outside-toplevel
  workdir, model = workdir or None, model or None
  if workdir and model:
    raise ValueError("give one of --workdir (a training run's directory) or --model (an "
                     "exported reader's directory), not both")
  if workdir or model:
    return workdir, model
  default = serving.find_default_reader()
  if default is None:
    raise ValueError(serving.no_reader_message())
  return None, str(default)


def _run_only_flags(model: str | None) -> str | None:
  """Why flags that choose how a training run reads were given with an exported reader
  (--model, or the released one), or None."""
  if not model:
    return None
  given = [f"--{name}" for name in ("checkpoint", "beam_size", "alpha", "views", "ensemble")
           if FLAGS[name].present]
  if given:
    return (f"{', '.join(given)} apply to --workdir only: an exported reader's checkpoint and "
            "decoding were fixed when it was exported (python -m digit_vit.export)")
  return None


def _load_exported(directory: str, **kwargs):
  """`serving.load`, with jax's persistent compilation cache on (`serving.
  enable_compilation_cache`), so that the next command starts without compiling."""
  from digit_vit import serving  # pylint: disable=import-outside-toplevel
  serving.enable_compilation_cache()
  return serving.load(directory, **kwargs)


def _finish(predictions: Sequence[Prediction]) -> int:
  """The exit status of a command that read `predictions` (1 when a file failed or there was
  none), after saying so on stderr."""
  failures = sum(p.error is not None for p in predictions)
  if failures:
    print(f"{failures} of {len(predictions)} file(s) could not be read", file=sys.stderr)
  if not predictions:
    print("no image files found", file=sys.stderr)
  return 1 if failures or not predictions else 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
