"""Draws docs/reading.png, the README's picture: wild and long lines as a user gives them,
with what a reader reads (green right, red wrong) and its confidence: a trained run's
in-process Reader, or, given MODEL, an exported reader (the README's is the release's).

  python docs/reading_png.py RUN [MODEL]    # e.g. runs/release release/reader
"""
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from digit_vit import (file_evaluation, predict, preprocess, serving,  # pylint: disable=wrong-import-position
                       trained)
from digit_vit.data import wild  # pylint: disable=wrong-import-position

run = sys.argv[1]
r = (serving.load(sys.argv[2]) if len(sys.argv) > 2
     else predict.Reader(run, checkpoint="latest", batch_size=16))
config = trained.load_config(run)  # Where the run's wild and long lines are.
picks = []
for split, idx in (("wild", [3, 12, 21, 46, 62, 95]), ("long", [5, 14])):
  rows = wild.load_labels(file_evaluation.build_split(config, split))
  picks += [rows[i] for i in idx]
images = [preprocess.load_image(p) for p, _ in picks]
preds = r.read(images)
fig, axes = plt.subplots(4, 2, figsize=(10, 5.2))
for ax, (p, truth), im, pr in zip(axes.T.ravel(), picks, images, preds):
  ax.imshow(np.asarray(im.convert("L")) if hasattr(im, "convert") else im, cmap="gray")
  ax.axis("off")
  ok = pr.digits == truth
  ax.set_title(f"read {pr.digits}  ({pr.confidence:.0%})" + ("" if ok else f"  true {truth}"),
               fontsize=10, color="green" if ok else "red")
fig.tight_layout()
fig.savefig("docs/reading.png", dpi=72)
print([(t, pr.digits) for (_, t), pr in zip(picks, preds)])
