"""Width buckets: the widths a batch of lines is padded to (numpy only, so `predict`, the demo
and an exported reader (`serving`, which uses `bucket_index`) use them without TensorFlow or
ml_collections).

Lines keep their natural width; a batch is padded on the right with background to the narrowest
bucket of `config.width_buckets` that holds its lines, so `jit` compiles one program a bucket.
"""

from __future__ import annotations

import math

import numpy as np


def width_buckets(config) -> tuple[int, ...]:
  """The width buckets, validated: `config.width_buckets`, else the one bucket
  `(config.image_width,)` (a fixed canvas, as before buckets).

  Raises:
    ValueError, saying what to change, unless they are ascending positive multiples of 8 (the
    lines' width multiple) and of the patch width, the widest equal to config.image_width.
  """
  from digit_vit.data import compose  # Here, not above: `bucket_index` needs numpy alone.

  widest = int(config.data.image_width)
  raw = config.get("width_buckets", None)
  if raw is None or (not isinstance(raw, (int, np.integer)) and len(raw) == 0):
    raw = (widest,)  # config.data.image_width follows config.image_width
  elif isinstance(raw, (int, np.integer)):
    raw = (raw,)
  buckets = tuple(int(w) for w in raw)
  model = config.get("model", None)
  patch_w = int(model.get("patch_size", (1, 1))[1]) if model is not None else 1
  if any(w < 1 for w in buckets) or any(a >= b for a, b in zip(buckets, buckets[1:])):
    raise ValueError(f"config.width_buckets={buckets} must be strictly ascending positive widths")
  unit = math.lcm(compose.WIDTH_MULTIPLE, patch_w)
  bad = [w for w in buckets if w % unit]
  if bad:
    raise ValueError(f"config.width_buckets {bad} must be multiples of {unit} (lines are "
                     f"multiples of {compose.WIDTH_MULTIPLE} pixels wide and the patch width "
                     f"config.model.patch_size[1] is {patch_w})")
  if buckets[-1] != widest:
    raise ValueError(f"config.image_width={widest} must equal the widest of "
                     f"config.width_buckets={buckets}: set config.image_width={buckets[-1]}")
  return buckets


def bucket_index(widths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
  """int64 [n]: for each width [n], the index of the narrowest bucket that holds it."""
  widths = np.asarray(widths)
  if widths.size and widths.max() > buckets[-1]:
    raise ValueError(f"a line {int(widths.max())} pixels wide is wider than the widest bucket "
                     f"{buckets[-1]}: the dataset was built for another config.image_width")
  return np.searchsorted(np.asarray(buckets), widths, side="left")
