"""The end-of-run report: report.json, loss and accuracy curves (against steps, and per epoch as
in the seeds' coursework), and a grid of test readings.

The curves come from `history.jsonl`, one JSON line per logged step and split, which the
trainer appends as it goes; a resumed run first drops the lines after the restored step, so a
killed-and-resumed run has the same history as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # Files only; no display on servers.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from digit_vit import tasks  # noqa: E402
from digit_vit.models import tokens as tokens_lib  # noqa: E402

REPORT_FILE = "report.json"
LOSS_PLOT = "curves_loss.png"
ACCURACY_PLOT = "curves_accuracy.png"
EPOCH_PLOT = "curves_epochs.png"
READINGS_PLOT = "readings.png"


class History:
  """Appends {step, split, metrics...} records to a JSON-lines file (no-op when disabled)."""

  def __init__(self, path: str, *, enabled: bool = True):
    self.path = path
    self.enabled = enabled

  def append(self, step: int, split: str, values: Mapping[str, float]):
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")

  def load(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate(self, *, after_step: int):
    """Drops records of steps after `after_step` (written before a kill, redone on resume)."""
    if self.enabled:
      kept = [r for r in self.load() if r["step"] <= after_step]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def _series(history: Sequence[dict], split: str, key: str):
  points = [(r["step"], r[key]) for r in history if r["split"] == split and key in r]
  return ([s for s, _ in points], [v for _, v in points])


def plot_curves(history: Sequence[dict], path: str, keys: Sequence[tuple[str, str]], *,
                ylabel: str, steps_per_epoch: float | None = None, log_scale: bool = False):
  """One line per (split, metric key) against the step, with epochs on the top axis."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for split, key in keys:
    steps, values = _series(history, split, key)
    if steps:
      ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=f"{split} {key}")
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  if log_scale:
    ax.set_yscale("log")
  if steps_per_epoch:
    ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch,
                                         lambda e: e * steps_per_epoch)).set_xlabel("epoch")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def epoch_means(history: Sequence[dict], split: str, key: str,
                steps_per_epoch: float) -> tuple[list[float], list[float]]:
  """The mean of a logged metric over each epoch: epoch e (1, 2, ...) holds the records of
  steps in ((e - 1) * steps_per_epoch, e * steps_per_epoch]; a last, unfinished epoch is
  placed at its fractional end. Returns (epoch ends, means), epochs with records only."""
  by_epoch: dict[int, list[float]] = {}
  last_step = 0
  for step, value in zip(*_series(history, split, key)):
    by_epoch.setdefault(max(1, math.ceil(step / steps_per_epoch)), []).append(value)
    last_step = max(last_step, step)
  ends = [min(float(e), last_step / steps_per_epoch) for e in sorted(by_epoch)]
  return ends, [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)]


def plot_epoch_curves(history: Sequence[dict], path: str, *, steps_per_epoch: float, task: str):
  """Loss and accuracy per epoch side by side, as the seeds' coursework plots them: the train
  metrics averaged over each epoch, the validation ones where they were measured. `task`:
  the run's `config.task`, whose `tasks.Task.accuracy_curves` are drawn."""
  accuracy_keys = list(tasks.by_name(task).accuracy_curves)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, keys, title in ((axes[0], [("train", "loss"), ("validation", "loss")], "Loss/Epoch"),
                          (axes[1], accuracy_keys, "Accuracy/Epoch")):
    for split, key in keys:
      if split == "train":
        epochs, values = epoch_means(history, split, key, steps_per_epoch)
      else:
        steps, values = _series(history, split, key)
        epochs = [s / steps_per_epoch for s in steps]
      if epochs:
        ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None,
                label=f"{split} {key}" + (" (epoch mean)" if split == "train" else ""))
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_ylabel("cross-entropy")
  axes[1].set_ylabel("accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _label_text(sample: Mapping[str, np.ndarray], i: int, task: str) -> tuple[str, str, bool]:
  """(truth, reading, correct) of example i of an evaluation sample of `task` (a name)."""
  if tasks.by_name(task).reads_lines:
    truth = tokens_lib.decode_sequence(sample["tokens"][i])
    reading = tokens_lib.read_output(sample["prediction"][i])
    text = (reading.digits or "nothing") + ("" if reading.ended else " (no <eos>)")
    return truth, text, reading.ended and reading.digits == truth
  truth, predicted = int(sample["label"][i]), int(sample["prediction"][i])
  return str(truth), str(predicted), truth == predicted


def plot_readings(sample: Mapping[str, np.ndarray], path: str, *, task: str,
                  max_images: int = 24, columns: int = 4,
                  notes: Sequence[str] | None = None):
  """A grid of evaluation images titled with the reading (green right, red wrong) and truth,
  and under it `notes[i]` when given (a second title line: e.g. the split and confidence).

  `sample` may hold lists of arrays of different widths (`image` [H, W(, 1)] each, `tokens` a
  full target sequence each) as well as batched arrays."""
  index = [i for i in range(len(sample["mask"])) if sample["mask"][i]][:max_images]
  rows = max(1, -(-len(index) // columns))
  row_height = 1.3 + (0.25 if notes is not None else 0.0)
  fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, row_height * rows + 0.4),
                           squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, i in zip(axes.ravel(), index):
    image = sample["image"][i]
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else np.clip(image, 0, 1),
              cmap="gray", vmin=0, vmax=1)
    truth, text, right = _label_text(sample, i, task)
    title = f"read {text} | true {truth}"
    if notes is not None:
      title += f"\n{notes[i]}"
    ax.set_title(title, fontsize=8, color="green" if right else "red")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(workdir: str, report: Mapping, history: Sequence[dict],
                 sample: Mapping[str, np.ndarray] | None, *, task: str,
                 steps_per_epoch: float | None = None):
  """Writes report.json, the curves (per epoch too, given steps_per_epoch) and (given a sample)
  the readings grid into workdir."""
  with open(os.path.join(workdir, REPORT_FILE), "w") as f:
    json.dump(dict(report), f, indent=2, sort_keys=True)
  plot_curves(history, os.path.join(workdir, LOSS_PLOT),
              [("train", "loss"), ("validation", "loss")], ylabel="cross-entropy",
              steps_per_epoch=steps_per_epoch, log_scale=True)
  accuracy_keys = list(tasks.by_name(task).accuracy_curves)
  plot_curves(history, os.path.join(workdir, ACCURACY_PLOT), accuracy_keys, ylabel="accuracy",
              steps_per_epoch=steps_per_epoch)
  if steps_per_epoch:
    plot_epoch_curves(history, os.path.join(workdir, EPOCH_PLOT),
                      steps_per_epoch=steps_per_epoch, task=task)
  if sample is not None:
    plot_readings(sample, os.path.join(workdir, READINGS_PLOT), task=task)
