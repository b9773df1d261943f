"""Per-digit accuracy of the reader's encoder, by conv stem and distortion.

A line is read exactly only when every digit on it is, so on lines of 1-8 digits (4.5 on
average) exact match is about p ** 4.5 for a per-digit accuracy p: 95% needs p near 98.9%.
`configs/digit_probe.py` measures p in minutes: the default reader's encoder (32x8 strips from
the conv stem, width 128, 4 blocks, dropout 0.1) classifies single embedded digits padded to
32x32, trained on rows 0-359 of each class with the long run's distortions (affine 0.5,
elastic 0.3) for 40 epochs, and tested on the 1,000 held-out rows 400-499. The points add
residual stride-1 convolutions to the stem (`model.stem_depth`, with or without a cap on its
channels), distort more, or train 3x longer. With 1,000 test digits one standard error is
about 0.45 points at 98%.
"""

from experiments import sweep

STRONG = {"data.augment.affine_prob": 0.8, "data.augment.elastic_prob": 0.8,
          "data.augment.elastic_alpha": 2.0}
DEEP_CAPPED = {"model.stem_depth": 1, "model.stem_max_channels": 64}


def conclusion(rows):
  done = sweep.ok_rows(rows)
  listing = "; ".join(f"{r['label']}: {sweep.pct(r['test_accuracy'])} "
                      f"({r['num_params'] / 1e6:.2f} M parameters)" for r in done)
  top = sweep.best(done, "test_accuracy")
  p = top["test_accuracy"]
  return (f"Test accuracy on the held-out digits: {listing}. The best, {top['label']}, "
          f"misreads {round((1 - p) * top['test_num_examples'])} of "
          f"{top['test_num_examples']:,}; at that per-digit accuracy a line of 4.5 digits is "
          f"read exactly about {sweep.pct(p ** 4.5)} of the time, and one of 8 digits "
          f"{sweep.pct(p ** 8)}." + sweep.failed_note(rows))


GRID = {
    "strided stem": {},
    "+1 residual conv a stage": {"model.stem_depth": 1},
    "+1, channels capped at 64": DEEP_CAPPED,
    "+2, channels capped at 64": {"model.stem_depth": 2, "model.stem_max_channels": 64},
    "+1 capped, strong distortions": {**DEEP_CAPPED, **STRONG},
    "elastic on every digit": {"data.augment.elastic_prob": 1.0},
    "120 epochs": {"num_train_steps": 3_375, "eval_every_steps": 675,
                   "checkpoint_every_steps": 3_375},
}
# Quick mode: the same points at 40 steps, the long one at 3x that.
QUICK_GRID = {**GRID, "120 epochs": {"num_train_steps": 120}}


SWEEP = sweep.Sweep(
    name="digit_probe",
    title="Per-digit accuracy of the reader's encoder",
    question=__doc__.split("\n", 2)[2],
    base="digit_probe",
    grid=GRID,
    quick_base="digit_probe:quick",
    quick={"num_train_steps": 40, "warmup_steps": 5, "log_every_steps": 10,
           "eval_every_steps": 20, "checkpoint_every_steps": 40},
    quick_grid=QUICK_GRID,
    columns=("test_accuracy", "validation_accuracy", "test_loss", "train_images_per_second",
             "num_params", "steps"),
    bars=("test_accuracy", "validation_accuracy"),
    scatter=(("train_images_per_second", "test_accuracy"),),
    per_length=False,
    conclusion=conclusion,
)
