"""Evaluates a reader on the `wild` and `long` splits: image files read as a user reads them.

The TFDS splits (`train`, `validation`, `test`) are canvases the model takes as they are; the
file splits (`data/wild.py`) are images of any size that go through `predict`'s preprocessing
(polarity, cropping, stroke width, fitting to the canvas) first, so their figures are what
`python -m digit_vit.predict` gets. The metrics are those of the TFDS splits
(`metrics.reading_sums`), keyed the same way (`wild_exact_match`, `long_cer`,
`long_exact_match_length_12`, ...), plus `truncated`: readings that hit the decoder's maximum
length without `<eos>`. `evaluate_with_lines` also returns each line's reading as
`calibration.Lines`, from the same pass, for the selective-prediction figures.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, Sequence

import numpy as np

from digit_vit import calibration, metrics
from digit_vit.data import wild
from digit_vit.models import tokens

SPLITS = wild.SPLITS
# The longest line of any file split (long: 16 digits); sizes the per-length metrics.
MAX_DIGITS = max(max(style.lengths) for style in wild.STYLES.values())


class ImageReader(Protocol):
  """What is evaluated: `predict.Reader` (or anything that reads images the same way)."""

  batch_size: int

  def read(self, images: Sequence[np.ndarray]) -> Sequence[Any]:
    """One prediction (with `.tokens`) per image."""


def split_root(config) -> str:
  """Where a run's file splits are built: `config.data.eval_lines_dir`, else `eval_lines/`
  beside its TFDS data. A split's folder is named by everything that decides its images, so
  runs (and test sessions) may share one root."""
  chosen = config.data.get("eval_lines_dir", "") or ""
  if chosen:
    return os.path.abspath(chosen)
  from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
  return os.path.join(input_pipeline.data_dir_from(config), "eval_lines")


def build_split(config, split: str) -> str:
  """Builds (once) the file split for the run's digit source; returns its folder."""
  data = config.data
  return str(wild.build(split, split_root(config), source=data.source,
                        source_dir=data.source_dir, seed=int(data.seed),
                        validation_per_class=int(data.validation_per_class)))


def evaluate(reader: ImageReader, config, split: str, *,
             num_examples: int = -1) -> dict[str, float]:
  """Builds (once) the file split of the run's digit source and reads it with `reader`."""
  return evaluate_split(reader, build_split(config, split), num_examples=num_examples)


def evaluate_with_lines(reader: ImageReader, config, split: str, *, num_examples: int = -1):
  """`evaluate`, and the lines' readings: (metrics, `calibration.Lines` or None)."""
  return evaluate_split_with_lines(reader, build_split(config, split),
                                   num_examples=num_examples)


def evaluate_split(reader: ImageReader, folder: str | os.PathLike, *,
                   num_examples: int = -1) -> dict[str, float]:
  """Reads every line of a built file split and scores the readings.

  Args:
    reader: reads a list of greyscale arrays (see `ImageReader`).
    folder: a split built by `wild.build`.
    num_examples: the first this many lines; -1 = all.

  Returns:
    the metrics of `metrics.summarize`, plus `truncated` (int).
  """
  return evaluate_split_with_lines(reader, folder, num_examples=num_examples)[0]


def evaluate_split_with_lines(reader: ImageReader, folder: str | os.PathLike, *,
                              num_examples: int = -1):
  """`evaluate_split`, and each line's reading for calibration.

  Returns:
    (metrics, lines): lines is `calibration.Lines` of every line read, or None when the
    reader's predictions do not carry `step_log_probs` (a reader other than `predict.Reader`).
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  labels = wild.load_labels(folder)
  if num_examples >= 0:
    labels = labels[:num_examples]
  sums, truncated, lines = None, 0, []
  chunk = max(64, reader.batch_size)  # Only this many decoded images are held at once.
  for start in range(0, len(labels), chunk):
    rows = labels[start:start + chunk]
    images = []
    for path, _ in rows:
      with Image.open(path) as image:
        images.append(np.asarray(image.convert("L")))
    predictions = reader.read(images)
    outputs = np.stack([_padded(p.tokens, MAX_DIGITS + 1) for p in predictions])
    targets = tokens.encode_batch([text for _, text in rows], MAX_DIGITS)[:, 1:]
    truncated += sum(not tokens.read_output(p.tokens).ended for p in predictions)
    sums = metrics.add_sums(sums, metrics.reading_sums(outputs, targets,
                                                       max_digits=MAX_DIGITS))
    if lines is not None:
      lines = _add_lines(lines, predictions, targets)
  result = metrics.summarize(sums)
  result["truncated"] = int(truncated)
  return result, None if lines is None else calibration.Lines.concatenate(lines)


def _add_lines(lines: list, predictions, targets) -> list | None:
  """`lines` with the chunk's `calibration.Lines` added, or None where a prediction carries
  no distributions (then no confidence figures are made)."""
  steps = []
  for p in predictions:
    dists = getattr(p, "step_log_probs", None)
    if dists is None and not getattr(p, "no_ink", False):
      return None
    # An image with no ink reads as empty with probability 1 at any temperature.
    steps.append(calibration.certain_step(len(p.tokens)) if dists is None
                 else np.asarray(dists, np.float32))
  outputs = np.stack([np.asarray(p.tokens, np.int32) for p in predictions])
  lines.append(calibration.Lines(np.stack(steps), outputs,
                                 metrics.exact_matches(outputs, targets)))
  return lines


def _padded(row: Sequence[int], length: int) -> np.ndarray:
  row = np.asarray(row, np.int32)[:length]
  return np.pad(row, (0, length - len(row)), constant_values=tokens.PAD)
