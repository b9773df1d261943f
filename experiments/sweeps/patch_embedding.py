"""Linear patch embedding against a convolutional stem.

The ViT paper embeds each flattened patch with one matrix; the seeds' course also names a
CNN that turns each patch into an embedding. The conv stem here is 3x3 convolutions of stride
2 until the patch size is reached, so each token also sees a little of its neighbours. Both
at the default's full-height 32x8 strips and at the ViT's 16x16 patches.
"""

from experiments import sweep


def conclusion(rows):
  by = {r["label"]: r for r in sweep.ok_rows(rows)}
  parts = []
  for size in ("32x8", "16x16", "16x8", "8x8"):
    linear, conv = by.get(f"linear {size}"), by.get(f"conv {size}")
    if linear and conv:
      diff = 100 * (conv["test_exact_match"] - linear["test_exact_match"])
      parts.append(
          f"at {size} the conv stem reads {sweep.pct(conv['test_exact_match'])} against "
          f"{sweep.pct(linear['test_exact_match'])} linear ({diff:+.1f} points) at "
          f"{conv.get('train_images_per_second', 0):,.0f} against "
          f"{linear.get('train_images_per_second', 0):,.0f} training images/s")
  if not parts:
    return "No pair of points finished." + sweep.failed_note(rows)
  diffs = [by[f"conv {s}"]["test_exact_match"] - by[f"linear {s}"]["test_exact_match"]
           for s in ("32x8", "16x16", "16x8", "8x8") if f"conv {s}" in by and f"linear {s}" in by]
  verdict = ("The conv stem is the more accurate embedding at every patch size tried."
             if all(d > 0.01 for d in diffs) else
             "The linear embedding is as good or better at every patch size tried."
             if all(d <= 0.01 for d in diffs) else
             "Which embedding wins depends on the patch size.")
  return "Measured: " + "; ".join(parts) + ". " + verdict + sweep.failed_note(rows)


SWEEP = sweep.Sweep(
    name="patch_embedding",
    title="Linear patch embedding against a conv stem",
    question=__doc__.split("\n", 2)[2],
    base="experiment",
    grid={f"{kind} {h}x{w}": {"model.patch_size": (h, w), "model.patch_embedding": kind}
          for h, w in ((32, 8), (16, 16)) for kind in ("linear", "conv")},
    # The quick canvas is 16x48: full-height strips are 16x8, and 8x8 squares.
    quick_grid={f"{kind} {h}x{w}": {"model.patch_size": (h, w), "model.patch_embedding": kind}
                for h, w in ((16, 8), (8, 8)) for kind in ("linear", "conv")},
    columns=("test_exact_match", "test_cer", "test_token_accuracy", "train_images_per_second",
             "test_images_per_second", "num_params"),
    scatter=(("train_images_per_second", "test_exact_match"),),
    conclusion=conclusion,
)
