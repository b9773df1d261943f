"""Patch size: test exact match against training and reading speed.

The seeds' slide on patches: "smaller patches -> accuracy" (more, finer tokens for the encoder)
and, the other way, fewer and larger patches -> efficiency. The default canvas (32x192) allows
4x4 (384 tokens), 4x8 (192), 8x8 (96), 16x16 (24) and the default's full-height 32x8 strips
(24 tokens in one row), all with the ViT's linear patch embedding. The 4x4 point takes hours
on a laptop CPU and runs only with `--costly`.
"""

from experiments import sweep

PATCHES = {"4x4": (4, 4), "4x8": (4, 8), "8x8": (8, 8), "16x16": (16, 16),
           "32x8 strips": (32, 8)}
# The tiny quick canvas is 16x48: 4x4 (48 tokens), 4x8 (24), 8x8 (12), 16x16 (3), 16x8 (6).
QUICK_PATCHES = {"4x4": (4, 4), "4x8": (4, 8), "8x8": (8, 8), "16x16": (16, 16),
                 "16x8 strips": (16, 8)}


def _area(row):
  height, width = row["varied"]["model.patch_size"]
  return height * width


def conclusion(rows):
  done = [r for r in sweep.ok_rows(rows) if "test_exact_match" in r]
  # From the largest patch (fewest tokens) to the smallest.
  done.sort(key=lambda r: -_area(r))
  exact = [r["test_exact_match"] for r in done]
  speed = [r.get("train_images_per_second", float("nan")) for r in done]
  top, fast = sweep.best(done, "test_exact_match"), sweep.best(done, "train_images_per_second")
  order = " -> ".join(f"{r['label']} {sweep.pct(r['test_exact_match'])}" for r in done)
  rates = " -> ".join(f"{r['label']} {r.get('train_images_per_second', 0):,.0f}" for r in done)
  text = (
      "From the largest patch to the smallest, test exact match "
      f"{sweep.trend(exact, tolerance=0.01)} ({order}) while training images/s "
      f"{sweep.trend(speed)} ({rates}). "
      f"The most accurate point is {top['label']} ({sweep.pct(top['test_exact_match'])}, "
      f"{top.get('train_images_per_second', 0):,.0f} training images/s); the fastest, "
      f"{fast['label']}, trains "
      f"{fast['train_images_per_second'] / top['train_images_per_second']:.1f}x as fast and "
      f"reaches {sweep.pct(fast['test_exact_match'])}. ")
  if top["label"] == done[-1]["label"]:
    text += "So at an equal number of steps the seeds' 'smaller patches -> accuracy' holds here"
  else:
    text += ("So the smallest patch is not the most accurate at an equal number of steps: "
             "here finer tokens did not pay for themselves within this budget")
  largest, smallest = done[0], done[-1]
  text += (f"; the price of small patches is speed: {smallest['label']} trains at "
           f"{smallest['train_images_per_second'] / largest['train_images_per_second']:.2f}x "
           f"the rate of {largest['label']}.")
  return text + sweep.failed_note(rows)


SWEEP = sweep.Sweep(
    name="patch_size",
    title="Patch size: accuracy against images/s",
    question=__doc__.split("\n", 2)[2],
    base="experiment",
    fixed={"model.patch_embedding": "linear"},
    grid={label: {"model.patch_size": size} for label, size in PATCHES.items()},
    quick_grid={label: {"model.patch_size": size} for label, size in QUICK_PATCHES.items()},
    columns=("test_exact_match", "test_cer", "test_token_accuracy", "train_images_per_second",
             "test_images_per_second", "num_params", "test_no_eos"),
    scatter=(("train_images_per_second", "test_exact_match"),
             ("test_images_per_second", "test_exact_match")),
    # 4x4 patches are 384 tokens: about 6x the FLOPs of 8x8 per image and 3-4 hours for the
    # 2,000 steps on the 2-core development CPU (`--estimate`); it runs with --costly.
    costly=("4x4",),
    conclusion=conclusion,
)
