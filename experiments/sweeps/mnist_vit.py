"""ViT classifier with a class token on single MNIST digits, by patch size.

`configs/mnist_vit.py` trains on the embedded digits' rows 0-359 of each class (rows 360-399
validate) and tests on the held-out rows 400-499 of each class: 1,000 digits that no training
step has seen. 7x7 patches give the seeds' 16 tokens (plus the class token), 4x4 patches 49
and 14x14 patches 4. Each run also writes its per-epoch loss and accuracy curves
(`curves_epochs.png` in its workdir), as in the seeds' coursework.
"""

from experiments import sweep


def conclusion(rows):
  done = sorted(sweep.ok_rows(rows), key=lambda r: -r["varied"]["model.patch_size"][0])
  listing = "; ".join(
      f"{r['label']}: {sweep.pct(r['test_accuracy'])} test accuracy "
      f"({r.get('train_images_per_second', 0):,.0f} training images/s)" for r in done)
  top = sweep.best(done, "test_accuracy")
  errors = round((1 - top["test_accuracy"]) * top["test_num_examples"])
  direction = sweep.trend([r["test_accuracy"] for r in done], tolerance=0.002)
  return (f"On the {top['test_num_examples']:,} held-out test digits: {listing}. The best, "
          f"{top['label']}, misreads {errors} of them; accuracy {direction} as the patches "
          "shrink." + sweep.failed_note(rows))


SWEEP = sweep.Sweep(
    name="mnist_vit",
    title="ViT classifier on single MNIST digits",
    question=__doc__.split("\n", 2)[2],
    base="mnist_vit",
    grid={f"{p}x{p} patches": {"model.patch_size": (p, p)} for p in (14, 7, 4)},
    quick_base="mnist_vit",
    quick={"num_train_steps": 120, "warmup_steps": 10, "log_every_steps": 7,
           "eval_every_steps": 28, "checkpoint_every_steps": 120},
    columns=("test_accuracy", "validation_accuracy", "test_loss", "train_images_per_second",
             "num_params", "steps"),
    bars=("test_accuracy", "validation_accuracy"),
    scatter=(("train_images_per_second", "test_accuracy"),),
    per_length=False,
    conclusion=conclusion,
)
