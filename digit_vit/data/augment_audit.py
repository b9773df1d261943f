r"""How much of each digit the train-time affine distortion moves off the canvas.

  python -m digit_vit.data.augment_audit --config=configs/long.py [--lines=3000] [--data_dir=DIR]

A line keeps its label whatever the distortion does to it, so a digit turned, scaled or shifted
half off the canvas is a label the image no longer supports. For the first `--lines` train
lines this draws one affine map each (`input_pipeline.affine_transform`, the code the pipeline
runs) and prints the fraction of lines on which some digit loses more than 5 / 10 / 25 / 50% of
its ink, overall and by length.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags

from digit_vit import cli
from digit_vit.data import input_pipeline

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global."""
  cli.define_data_flags(flag_values, argv)
  flags.DEFINE_integer("lines", 3000, "Train lines to distort, from the first.",
                       flag_values=flag_values)


THRESHOLDS = (0.05, 0.1, 0.25, 0.5)


def ink_lost(image: np.ndarray, bboxes: np.ndarray, transform: np.ndarray) -> np.ndarray:
  """The fraction of each digit's ink whose pixel centres the map sends off the canvas.

  Args:
    image: float32 [H, W, 1] in [0, 1], ink bright: a line at its natural width, which is the
      canvas the pipeline distorts it on.
    bboxes: float32 [n, 4], (ymin, xmin, ymax, xmax) of each digit, normalised to [0, 1]; ink
      inside a box counts for that digit (so an overlapping neighbour's strokes count too).
    transform: [8] output -> input map, as `input_pipeline.affine_transform` returns it.

  Returns:
    float64 [n] in [0, 1]; 0 for a digit with no ink.
  """
  h, w = image.shape[:2]
  a0, a1, a2, b0, b1, b2 = (float(v) for v in np.asarray(transform)[:6])
  # in = A out + b  =>  out = A^-1 (in - b).
  inverse = np.linalg.inv(np.array([[a0, a1], [b0, b1]]))
  ys, xs = np.nonzero(image[..., 0] > input_pipeline.INK_THRESHOLD)
  ink = image[ys, xs, 0].astype(np.float64)
  out_x, out_y = inverse @ np.stack([xs - a2, ys - b2])
  # Pixel i covers [i - 0.5, i + 0.5]: a centre mapped beyond the canvas's edge is lost.
  off = (out_x < -0.5) | (out_x > w - 0.5) | (out_y < -0.5) | (out_y > h - 0.5)
  lost = np.zeros(len(bboxes))
  for d, box in enumerate(np.asarray(bboxes) * [h, w, h, w]):
    mine = (ys >= box[0]) & (ys < box[2]) & (xs >= box[1]) & (xs < box[3])
    total = ink[mine].sum()
    lost[d] = ink[mine & off].sum() / total if total > 0 else 0.0
  return lost


def worst_loss_per_line(images, bboxes, lengths, augment, *, seed: int = 0) -> np.ndarray:
  """float64 [n]: the largest fraction of one digit's ink lost, for one random map a line."""
  worst = np.zeros(len(images))
  for i, (image, boxes, n) in enumerate(zip(images, bboxes, lengths)):
    image = np.asarray(image, np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    transform = input_pipeline.affine_transform(tf.constant(image), tf.constant([seed, i]),
                                                augment).numpy()
    worst[i] = ink_lost(image, boxes[:n], transform).max()
  return worst


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  builder = input_pipeline.get_dataset_builder(config)
  n = min(FLAGS.lines, builder.info.splits["train"].num_examples)
  examples = list(tfds.as_numpy(builder.as_dataset(split=f"train[:{n}]", shuffle_files=False)))
  lines = {k: [ex[k] for ex in examples] for k in ("image", "bboxes")}
  lines["length"] = np.array([int(ex["length"]) for ex in examples])
  augment = config.data.augment
  max_len = int(lines["length"].max())
  print(f"{n} train lines of {builder.builder_config.name}, one affine map each "
        f"(rotation {augment.max_rotation} deg, scale {augment.max_scale_change}, shear "
        f"{augment.max_shear}, shift {augment.max_translate}):")
  header = " | ".join(f"> {t:.0%}" for t in THRESHOLDS)
  print(f"length | lines where a digit loses: {header}")
  worst = worst_loss_per_line(lines["image"], lines["bboxes"], lines["length"], augment)
  for length in ["all", *range(1, max_len + 1)]:
    rows = worst if length == "all" else worst[lines["length"] == length]
    cells = " | ".join(f"{np.mean(rows > t):7.2%}" for t in THRESHOLDS)
    print(f"{length:>6} | {cells}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
