r"""Writes a contact sheet of `multi_digit_mnist` examples with their labels, for people to look at.

  python -m digit_vit.data.preview --config=configs/default.py --output=/tmp/preview.png \
      [--split=train] [--num=40] [--columns=4] [--bboxes] [--data_dir=DIR]

Builds the dataset first if needed. Each cell shows a line (scaled up), its digit string and
length; with --bboxes each digit's box is drawn, coloured by position.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from digit_vit import cli

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None):
  """Defines the command's flags when it runs, not on import (`cli`; absl flags are global: a
  process that imports `contact_sheet` next to another command's module must not define them
  twice)."""
  cli.define_data_flags(flag_values, argv)
  f = flag_values
  flags.DEFINE_string("output", "preview.png", "PNG file to write.", flag_values=f)
  flags.DEFINE_enum("split", "train", ["train", "validation", "test"], "Split to show.",
                    flag_values=f)
  flags.DEFINE_integer("num", 40, "Number of examples.", flag_values=f)
  flags.DEFINE_integer("columns", 4, "Cells per row.", flag_values=f)
  flags.DEFINE_integer("scale", 2, "Pixel scale of the images.", flag_values=f)
  flags.DEFINE_bool("bboxes", False, "Draw each digit's bounding box.", flag_values=f)

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def contact_sheet(examples, *, columns: int = 4, scale: int = 2, bboxes: bool = False) -> Image.Image:
  """examples: dicts with image uint8 [H, W_i, 1] (lines differ in width), digits (str or
  bytes), length, bboxes (normalised by each line's own H and W_i). Cells are as wide as the
  widest line; a narrower line ends where the white sheet shows."""
  examples = list(examples)
  h = examples[0]["image"].shape[0]
  widest = max(ex["image"].shape[1] for ex in examples)
  cw, ch = widest * scale + 8, h * scale + 22
  rows = -(-len(examples) // columns)
  sheet = Image.new("RGB", (cw * columns, ch * rows), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for i, ex in enumerate(examples):
    x, y = (i % columns) * cw + 4, (i // columns) * ch + 4
    w = ex["image"].shape[1]
    img = Image.fromarray(np.asarray(ex["image"])[..., 0]).resize((w * scale, h * scale),
                                                                   Image.NEAREST).convert("RGB")
    sheet.paste(img, (x, y))
    digits = ex["digits"].decode() if isinstance(ex["digits"], bytes) else str(ex["digits"])
    if bboxes:
      for j in range(int(ex["length"])):
        y0, x0, y1, x1 = np.asarray(ex["bboxes"][j]) * [h * scale, w * scale, h * scale, w * scale]
        draw.rectangle([x + x0, y + y0, x + x1 - 1, y + y1 - 1], outline=_COLOURS[j % 8])
    draw.text((x, y + h * scale + 3), f"{digits}  (n={int(ex['length'])})", fill=(0, 0, 0))
  return sheet


def main(argv):
  del argv
  from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  f = FLAGS
  builder = input_pipeline.get_dataset_builder(f.config, f.data_dir)
  ds = builder.as_dataset(split=f"{f.split}[:{f.num}]", shuffle_files=False)
  sheet = contact_sheet(tfds.as_numpy(ds), columns=f.columns, scale=f.scale, bboxes=f.bboxes)
  sheet.save(f.output)
  print(f"wrote {f.output}: {f.num} {f.split} examples of {builder.builder_config.name}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
