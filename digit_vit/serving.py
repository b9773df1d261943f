r"""Reads lines of digits with an exported reader: jax, numpy and Pillow only.

  reader = serving.load("release/reader")          # or a directory `digit_vit.export` wrote
  [r.digits for r in reader.read([image_array, pil_image])]
  python -m digit_vit.predict --model=DIR IMAGE...  # the same from the command line
  python -m digit_vit.demo --model=DIR

An exported reader is a directory (`digit_vit.export` writes it, `FORMAT_VERSION` 1):

  manifest.json           what the reader is: the format version, the vocabulary, the canvas
                          height and width buckets, the decode settings, the calibration
                          temperature, the training config, the commit and the run's measured
                          metrics, and a SHA-256 of every file below
  params.npz              the model's parameters, one array per leaf, in the order
                          `manifest["parameters"]["names"]` lists them
  read_w<W>.jaxexport     one serialized `jax.export.Exported` (StableHLO) per width bucket W:
                          (params: list of arrays, images: float32 [b, H, W, 1] in [0, 1],
                          widths: int32 [b]) -> (tokens int32 [b, L], token_probs float32
                          [b, L], confidence float32 [b], log_prob float32 [b]); the batch b
                          is symbolic, L = manifest["decode"]["max_length"]
  attention_w<W>.jaxexport  (params, images, widths, tokens int32 [b, L]) -> float32
                          [b, L, H, W]: where the decoder looked while writing each token

Nothing here imports Flax, optax, orbax, TensorFlow, TFDS, ml_collections, absl or SciPy, and
the images are prepared by `digit_vit.preprocess`, the very code `predict` prepares them with,
so a reader loaded here reads what the in-process `predict.Reader` of the same run reads.

Each width bucket's function is compiled at its first use, for a batch of a power of two rows
(the rows of a call padded with copies of its last line), so a process that reads one small
image compiles one small program. `enable_compilation_cache` keeps the compiled programs on
disk (jax's persistent compilation cache), so that a second process starts without compiling.

Errors: `ArtifactError` (a ValueError) for a directory that is not a readable exported reader:
no manifest, a manifest of another format version (the message names both), missing fields, a
file that is missing, truncated or altered (its checksum), or that jax cannot deserialize.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import threading
import zipfile
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from digit_vit import preprocess, xla_options

FORMAT = "digit_vit.reader"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_FILE = "params.npz"
# Fields a manifest must have (dotted paths), checked at load.
REQUIRED_FIELDS = ("format", "format_version", "vocabulary.tokens", "vocabulary.eos",
                   "vocabulary.pad", "vocabulary.digits", "image.height", "image.channels",
                   "image.buckets", "decode.beam_size", "decode.views", "decode.max_length",
                   "calibration.temperature", "parameters.file", "parameters.sha256",
                   "parameters.names", "functions.read")
# The largest batch one compiled call takes; more images are read a batch of this at a time.
DEFAULT_BATCH_SIZE = 64
# The bound of the compilation cache `enable_compilation_cache` sets up.
CACHE_MAX_BYTES = 512 * 1024 ** 2
# The released reader (`make release`): `release/reader` of the repository this package lives
# in, wherever the command runs from. `predict` and the demo read with it when given neither a
# run nor an exported reader; the environment variable DIGIT_VIT_READER points them elsewhere.
RELEASE_READER = pathlib.Path(__file__).resolve().parent.parent / "release" / "reader"
READER_ENV = "DIGIT_VIT_READER"


def read_file_name(width: int) -> str:
  """The file of the reading function of width bucket `width`."""
  return f"read_w{int(width)}.jaxexport"


def attention_file_name(width: int) -> str:
  """The file of the attention-map function of width bucket `width`."""
  return f"attention_w{int(width)}.jaxexport"


def sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


class ArtifactError(ValueError):
  """A directory that is not a readable exported reader; the message says which file and why."""


@dataclasses.dataclass
class Reading:
  """One image's reading (the fields `predict.Prediction` has, so `predict` and the demo print,
  write and show either).

  Attributes:
    filename: the name it was given under ('' for in-memory images).
    tokens: raw decoder outputs without `<sos>`, `max_length` of them, e.g. [1, 0, 1, 11, 12,
      ...] for "101".
    digits: the digits read; '' for an image with no ink.
    confidence: the probability of the reading under the model, calibrated by the exported
      temperature, in [0, 1] (1 for an image with no ink: the model was not run).
    log_prob: log(confidence).
    token_probs: each written token's (calibrated) probability, `max_length` of them, 1 after
      `<eos>`: their product is `confidence`.
    rejected: confidence below the reader's `min_confidence`: a reading not to act on.
    no_ink: the image had no ink, so the model was not run.
    truncated: the decoder reached its maximum length without `<eos>`: the line may hold more
      digits than `digits` has.
    canvas: float32 [H, w] the model input in [0, 1], ink bright.
    attention: float32 [n, H, w] for the n tokens up to and including `<eos>`: the decoder's
      cross-attention over the image while it wrote each one (when asked for).
    error: why the file could not be read (then the other fields are empty).
  """
  filename: str = ""
  tokens: list[int] = dataclasses.field(default_factory=list)
  digits: str = ""
  confidence: float = 0.0
  log_prob: float = float("-inf")
  token_probs: list[float] = dataclasses.field(default_factory=list)
  rejected: bool = False
  no_ink: bool = False
  truncated: bool = False
  canvas: np.ndarray | None = None
  attention: np.ndarray | None = None
  error: str | None = None


class Config(dict):
  """A JSON config (nested dicts) whose fields read as attributes too, as an ml_collections
  ConfigDict's do: `config.model.patch_size`."""

  def __getattr__(self, name):
    try:
      value = self[name]
    except KeyError:
      raise AttributeError(name) from None
    return Config(value) if isinstance(value, dict) else value


def default_reader() -> pathlib.Path:
  """Where the default reader is looked for: $DIGIT_VIT_READER when set, else
  `RELEASE_READER` (the repository's `release/reader`)."""
  return pathlib.Path(os.environ.get(READER_ENV) or RELEASE_READER)


def find_default_reader() -> pathlib.Path | None:
  """The default reader's directory (`default_reader`) when it holds an exported reader (a
  manifest; `load` checks the rest), else None."""
  directory = default_reader()
  return directory if (directory / MANIFEST).is_file() else None


def no_reader_message(flags: str = "--workdir or --model") -> str:
  """The one-line usage error of a command given no reader when there is no default one."""
  return (f"no reader given ({flags}) and no released reader in {default_reader()}: train one "
          "(python -m digit_vit.main --config=configs/default.py --workdir=runs/default, then "
          "--workdir=runs/default), give an exported one (--model=DIR, python -m "
          "digit_vit.export), or build the release with `make release`")


def check_min_confidence(value: float) -> float:
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"min_confidence must be in [0, 1], got {value}")
  return value


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str | None:
  """Keeps compiled programs on disk (jax's persistent compilation cache), so that a later
  process reading with the same reader skips XLA compilation: the cold start of `predict
  --model` and the demo.

  Leaves jax's settings alone where the user chose: a cache directory already set
  (`JAX_COMPILATION_CACHE_DIR` or jax.config), or the cache turned off
  (`JAX_ENABLE_COMPILATION_CACHE=false`). Otherwise uses `directory`, by default
  `$XDG_CACHE_HOME/digit_vit/jax` (`~/.cache/digit_vit/jax`, at most `CACHE_MAX_BYTES`), and
  keeps every program, not only those that took a second to compile (the reader's take less).
  Global to the process: call it before the first compilation.

  Returns:
    the cache directory in use, or None (turned off).
  """
  if os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "").lower() in ("0", "false", "no"):
    return None
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if directory is None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(base, "digit_vit", "jax")
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None  # A read-only home: compile every time rather than fail.
  jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  # Entries are keyed by jax version too: bounded, older ones go first.
  jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  return os.fspath(directory)


# ----------------------------------------------------------------------------------------------
# The manifest


def _field(manifest: dict, dotted: str):
  value = manifest
  for key in dotted.split("."):
    if not isinstance(value, dict) or key not in value:
      raise KeyError(dotted)
    value = value[key]
  return value


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
  """The checked manifest of an exported reader.

  Raises:
    ArtifactError: no directory or manifest, not JSON, not a digit_vit reader, another format
      version (naming both), or fields missing (naming them).
  """
  directory = pathlib.Path(directory)
  path = directory / MANIFEST
  if not directory.is_dir():
    raise ArtifactError(f"{directory}: no such directory (an exported reader is a directory "
                        f"that python -m digit_vit.export writes)")
  if not path.is_file():
    raise ArtifactError(f"{directory} is not an exported reader: it has no {MANIFEST} (python "
                        f"-m digit_vit.export --workdir=RUN --output={directory} writes one)")
  try:
    manifest = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ArtifactError(f"{path} cannot be read as JSON ({e}): the export is damaged; export "
                        "the run again") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ArtifactError(f"{path} is not a digit_vit reader manifest (format "
                        f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected {FORMAT!r})")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ArtifactError(f"{directory} was exported in reader format version {version}, but this "
                        f"digit_vit reads format version {FORMAT_VERSION}: export the run again "
                        f"with this version (python -m digit_vit.export), or read it with the "
                        f"digit_vit that wrote it")
  missing = []
  for dotted in REQUIRED_FIELDS:
    try:
      _field(manifest, dotted)
    except KeyError:
      missing.append(dotted)
  if missing:
    raise ArtifactError(f"{path} lacks the field(s) {', '.join(missing)}: the export is "
                        "incomplete or was edited; export the run again")
  buckets = manifest["image"]["buckets"]
  if (not buckets or any(not isinstance(w, int) or w < 1 for w in buckets)
      or list(buckets) != sorted(set(buckets))):
    raise ArtifactError(f"{path}: image.buckets={buckets} must be ascending positive widths")
  for width in buckets:
    if str(width) not in manifest["functions"]["read"]:
      raise ArtifactError(f"{path}: functions.read has no function for width bucket {width}")
  return manifest


def _checked_file(directory: pathlib.Path, entry: dict, what: str) -> pathlib.Path:
  """The path of a file the manifest lists ({'file', 'sha256'}), after checking it is there and
  unaltered."""
  try:
    path = directory / entry["file"]
    expected = entry["sha256"]
  except (TypeError, KeyError):
    raise ArtifactError(f"{directory / MANIFEST}: the entry of {what} needs 'file' and "
                        "'sha256'") from None
  if not path.is_file():
    raise ArtifactError(f"{path} ({what}) is missing: the export is incomplete; export the "
                        "run again")
  if sha256(path) != expected:
    raise ArtifactError(f"{path} ({what}) is damaged: its contents differ from the checksum "
                        "in the manifest (truncated or altered); export the run again")
  return path


def _deserialize(path: pathlib.Path, what: str) -> jax.export.Exported:
  try:
    return jax.export.deserialize(bytearray(path.read_bytes()))
  except Exception as e:  # noqa: BLE001 - flatbuffers and MLIR raise many kinds
    raise ArtifactError(f"{path} ({what}) cannot be deserialized by jax {jax.__version__}: "
                        f"{type(e).__name__}: {str(e)[:200]}; export the run again with this "
                        "jax") from None


def _load_params(path: pathlib.Path, names: Sequence[str]) -> list[np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as archive:
      missing = [n for n in names if n not in archive.files]
      if missing:
        raise ArtifactError(f"{path} lacks the parameter(s) {missing[:5]}: the export is "
                            "damaged; export the run again")
      return [archive[name] for name in names]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, ArtifactError):
      raise
    raise ArtifactError(f"{path} cannot be read: {e}; export the run again") from None


# ----------------------------------------------------------------------------------------------
# The reader


class ExportedReader:
  """An exported reader, ready to read images (see `load`).

  Attributes:
    manifest: the checked manifest.
    height: the canvas height; `width` the widest bucket; `buckets` the width buckets.
    max_length: tokens a reading writes (`<eos>` included).
    beam_size, alpha, views, temperature: how it decodes (fixed at export).
    step: the training step of the exported parameters.
    min_confidence: readings below it are `rejected`.
    batch_size: the most images one compiled call reads.
  """

  def __init__(self, directory: str | os.PathLike, *, min_confidence: float = 0.0,
               batch_size: int = DEFAULT_BATCH_SIZE):
    self.directory = pathlib.Path(directory)
    manifest = read_manifest(self.directory)
    self.manifest = manifest
    vocabulary = manifest["vocabulary"]
    self.token_names = tuple(vocabulary["tokens"])
    self.eos, self.pad = int(vocabulary["eos"]), int(vocabulary["pad"])
    self._digit_of = {int(t): str(d) for d, t in enumerate(vocabulary["digits"])}
    self.height = int(manifest["image"]["height"])
    self.channels = int(manifest["image"]["channels"])
    self.buckets = tuple(int(w) for w in manifest["image"]["buckets"])
    self.width = self.buckets[-1]
    decoding = manifest["decode"]
    self.beam_size, self.views = int(decoding["beam_size"]), int(decoding["views"])
    self.alpha = float(decoding.get("alpha", 0.6))
    self.max_length = int(decoding["max_length"])
    self.temperature = float(manifest["calibration"]["temperature"])
    run = manifest.get("run") or {}
    self.step = int(run.get("step", 0) or 0)
    # The training config as the manifest records it, read by attribute as predict.Reader's
    # (`reader.config.max_digits`); empty for a manifest without one.
    self.config = Config(run.get("config") or {})
    self.ensemble = ()  # An exported reader is one model (the demo logs how many more read).
    self.min_confidence = check_min_confidence(min_confidence)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = int(batch_size)
    entry = manifest["parameters"]
    self._params = [jax.device_put(p) for p in _load_params(
        _checked_file(self.directory, entry, "the parameters"), entry["names"])]
    self._read = {w: self._function("read", w) for w in self.buckets}
    attention = manifest["functions"].get("attention", {})
    self._attention = {w: self._function("attention", w) for w in self.buckets
                       if str(w) in attention}
    self._lock = threading.Lock()
    self._shapes: set[tuple[int, int]] = set()  # (bucket, rows) read so far.
    self.compilations = 0  # Reading programs compiled by this reader: one per (bucket, rows).

  def _function(self, kind: str, width: int):
    """The jitted call of a deserialized function (compiled at its first call per shape)."""
    what = f"the {kind} function of width bucket {width}"
    path = _checked_file(self.directory, self.manifest["functions"][kind][str(width)], what)
    exported = _deserialize(path, what)
    expected = (self.height, width, self.channels)
    images = exported.in_avals[-2 if kind == "read" else -3]  # After the parameters.
    if tuple(images.shape[1:]) != expected:
      raise ArtifactError(f"{path} ({what}) takes images of shape {images.shape}, not "
                          f"[batch, *{expected}] as the manifest says")
    return xla_options.jit(exported.call, matmul_dtype=xla_options.matmul_dtype_of(self.config))

  def __repr__(self):
    return (f"ExportedReader({str(self.directory)!r}, step={self.step}, buckets={self.buckets}, "
            f"beam_size={self.beam_size}, views={self.views}, temperature={self.temperature})")

  # -- Preprocessing (numpy and Pillow; a server runs it outside any lock) ---------------------

  def prepare(self, images: Sequence[np.ndarray | Image.Image]) -> list[np.ndarray | None]:
    """The model inputs of `images` (`preprocess.to_canvas`, as `predict.Reader.prepare`):
    float32 [H, w] each, w a multiple of 8 up to the widest bucket, None for no ink."""
    return [preprocess.to_canvas(image, self.height, self.width) for image in images]

  # -- Reading ---------------------------------------------------------------------------------

  def read(self, images: Sequence[np.ndarray | Image.Image], *,
           min_confidence: float | None = None, attention: bool = False,
           filenames: Sequence[str] | None = None) -> list[Reading]:
    """Reads each image: numpy arrays ([H, W], [H, W, 1|3|4], uint8 or float in [0, 1]) or PIL
    images of any size, light ink on dark or dark on light.

    Args:
      min_confidence: readings below it are `rejected` (default: the reader's).
      attention: fill `Reading.attention` (one more compiled pass per batch).
      filenames: names to put in the readings.

    Raises:
      preprocess.ImageError: an array of another shape, or an image too elongated to hold a
        line.
    """
    return self.read_prepared(self.prepare(images), min_confidence=min_confidence,
                              attention=attention, filenames=filenames)

  def read_prepared(self, canvases: Sequence[np.ndarray | None], *,
                    min_confidence: float | None = None, attention: bool = False,
                    filenames: Sequence[str] | None = None) -> list[Reading]:
    """Reads what `prepare` made (None: an image with no ink); see `read`.

    Lines are read by width bucket (the narrowest that holds each), up to `batch_size` a call,
    each call padded to a power of two rows with copies of its last line.
    """
    threshold = (self.min_confidence if min_confidence is None
                 else check_min_confidence(min_confidence))
    filenames = list(filenames) if filenames is not None else [""] * len(canvases)
    readings = [self._no_ink(name) for name in filenames]
    inked = [i for i, c in enumerate(canvases) if c is not None]
    widths = np.array([canvases[i].shape[1] for i in inked], np.int64)
    if widths.size and widths.max() > self.width:
      raise ValueError(f"a canvas {int(widths.max())} pixels wide is wider than the widest "
                       f"bucket {self.width}: prepare images with this reader's `prepare`")
    bucket_of = np.searchsorted(np.asarray(self.buckets), widths, side="left")
    for bucket in sorted(set(int(b) for b in bucket_of)):
      in_bucket = [i for i, b in zip(inked, bucket_of) if b == bucket]
      width = self.buckets[bucket]
      for start in range(0, len(in_bucket), self.batch_size):
        rows = in_bucket[start:start + self.batch_size]
        batch = np.zeros((len(rows), self.height, width, self.channels), np.float32)
        valid = np.zeros((len(rows),), np.int32)
        for j, i in enumerate(rows):
          batch[j, :, :canvases[i].shape[1], :] = canvases[i][:, :, None]
          valid[j] = canvases[i].shape[1]
        out = self.read_batch(batch, valid, attention=attention)
        for j, i in enumerate(rows):
          maps = None if out["attention"] is None else out["attention"][j, :, :, :valid[j]]
          readings[i] = self._reading(filenames[i], out, j, canvases[i], maps, threshold)
    return readings

  def read_batch(self, images: np.ndarray, widths: np.ndarray, *,
                 attention: bool = False) -> dict[str, np.ndarray | None]:
    """The exported function on a prepared batch: the lowest level of reading.

    Args:
      images: float32 [n, H, W, C], W one of `buckets`, lines padded on the right with 0.
      widths: int32 [n] each line's width in pixels (<= W).
      attention: also compute the attention maps.

    Returns:
      {'tokens': int32 [n, L], 'token_probs': float32 [n, L], 'confidence': float32 [n],
       'log_prob': float32 [n], 'attention': float32 [n, L, H, W] or None}.
    """
    images = np.asarray(images, np.float32)
    widths = np.asarray(widths, np.int32)
    n, width = images.shape[0], images.shape[2]
    if width not in self._read:
      raise ValueError(f"images {width} pixels wide: the exported widths are {self.buckets}")
    rows = 1 << max(0, math.ceil(math.log2(max(n, 1))))  # The next power of two.
    if rows > n:  # Copies of the last line: they end when it ends (a blank line might not).
      images = np.concatenate([images, np.repeat(images[-1:], rows - n, axis=0)])
      widths = np.concatenate([widths, np.repeat(widths[-1:], rows - n)])
    # One call at a time: jax's dispatch is thread-safe, but a compilation per shape is enough.
    with self._lock:
      if (width, rows) not in self._shapes:
        self._shapes.add((width, rows))
        self.compilations += 1
      tokens, token_probs, confidence, log_prob = self._read[width](self._params, images, widths)
      maps = None
      if attention:
        if width not in self._attention:
          raise ValueError("this export has no attention function (export it again)")
        maps = self._attention[width](self._params, images, widths, tokens)
    tokens, token_probs, confidence, log_prob, maps = jax.device_get(
        (tokens, token_probs, confidence, log_prob, maps))
    return {"tokens": tokens[:n], "token_probs": token_probs[:n], "confidence": confidence[:n],
            "log_prob": log_prob[:n], "attention": None if maps is None else maps[:n]}

  def warm_up(self, widths: Sequence[int] | None = None, batch_sizes: Sequence[int] = (1,)):
    """Compiles the reading function for these buckets (default: all) and batch sizes ahead of
    the first reading (a server does it before its first request)."""
    for width in widths or self.buckets:
      for n in batch_sizes:
        self.read_batch(np.zeros((n, self.height, width, self.channels), np.float32),
                        np.full((n,), width, np.int32))

  # -- Readings --------------------------------------------------------------------------------

  def digits_of(self, tokens: Sequence[int]) -> tuple[str, bool]:
    """(the digits before the first `<eos>`, whether an `<eos>` was written) of raw outputs,
    as `tokens.read_output` reads them (tokens other than digits are skipped)."""
    digits = []
    for t in np.asarray(tokens).reshape(-1).tolist():
      if t == self.eos:
        return "".join(digits), True
      if t in self._digit_of:
        digits.append(self._digit_of[t])
    return "".join(digits), False

  def _reading(self, filename, out, j, canvas, maps, threshold) -> Reading:
    row = out["tokens"][j]
    digits, ended = self.digits_of(row)
    log_prob = float(out["log_prob"][j])
    confidence = float(np.exp(log_prob))  # As predict: float64 exp of the float32 log-prob.
    shown = len(digits) + 1 if ended else len(row)
    return Reading(filename=filename, tokens=[int(t) for t in row], digits=digits,
                   confidence=confidence, log_prob=log_prob,
                   token_probs=[float(p) for p in out["token_probs"][j]],
                   rejected=confidence < threshold, truncated=not ended, canvas=canvas,
                   attention=None if maps is None else np.asarray(maps[:shown]))

  def _no_ink(self, filename: str) -> Reading:
    return Reading(filename=filename, tokens=[self.eos] + [self.pad] * (self.max_length - 1),
                   digits="", confidence=1.0, log_prob=0.0,
                   token_probs=[1.0] * self.max_length, no_ink=True,
                   canvas=np.zeros((self.height, preprocess.WIDTH_MULTIPLE), np.float32))


def load(directory: str | os.PathLike, *, min_confidence: float = 0.0,
         batch_size: int = DEFAULT_BATCH_SIZE) -> ExportedReader:
  """Loads an exported reader (see the module docstring for the directory's files).

  Every file is checked against the manifest's checksums and deserialized now; the functions
  are compiled at their first reading (one program per width bucket and power-of-two batch).

  Args:
    directory: what `python -m digit_vit.export --output=DIR` wrote.
    min_confidence: in [0, 1]; readings below it are marked `rejected` (0: none).
    batch_size: the most images one compiled call reads.

  Raises:
    ArtifactError: not a readable exported reader (see the module docstring).
    ValueError: min_confidence outside [0, 1], or batch_size < 1.
  """
  return ExportedReader(directory, min_confidence=min_confidence, batch_size=batch_size)
