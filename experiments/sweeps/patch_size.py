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


def _tokens(row) -> int:
  """Encoder tokens of a point: its canvas cut into its patches."""
  height, width = row["varied"]["model.patch_size"]
  return (row["config"]["image_height"] // height) * (row["config"]["image_width"] // width)


def conclusion(rows):
  done = [r for r in sweep.ok_rows(rows) if "test_exact_match" in r]
  # Points with as many tokens (16x16 patches and 32x8 strips) are one step of the trend: the
  # question is what more, finer tokens buy, so each count is represented by its best point.
  by_tokens = {}
  for r in sorted(done, key=_tokens):
    by_tokens.setdefault(_tokens(r), []).append(r)
  groups = [(n, max(g, key=lambda r: r["test_exact_match"])) for n, g in by_tokens.items()]
  exact = [r["test_exact_match"] for _, r in groups]
  speed = [r.get("train_images_per_second", float("nan")) for _, r in groups]
  order = "; ".join(
      f"{n} tokens: " + ", ".join(f"{r['label']} {sweep.pct(r['test_exact_match'])} at "
                                  f"{r.get('train_images_per_second', 0):,.0f} images/s"
                                  for r in by_tokens[n])
      for n, _ in groups)
  top = sweep.best(done, "test_exact_match")
  text = (f"From the fewest tokens to the most ({order}), the best test exact match of each "
          f"token count {sweep.trend(exact, tolerance=0.01)} and training images/s "
          f"{sweep.trend(speed)}. The most accurate point is {top['label']} "
          f"({sweep.pct(top['test_exact_match'])}). ")
  if _tokens(top) == groups[-1][0]:
    text += "So at an equal number of steps the seeds' 'smaller patches -> accuracy' holds here"
  else:
    text += "So finer tokens did not pay for themselves at an equal number of steps"
  # The best point of the fewest and of the most tokens (not necessarily the fastest/slowest).
  (few, coarse), (many, fine) = groups[0], groups[-1]
  text += (f"; they also cost speed: {fine['label']} ({many} tokens) trains at "
           f"{fine['train_images_per_second'] / coarse['train_images_per_second']:.2f}x "
           f"the rate of {coarse['label']} ({few}).")
  learned = [(r["label"], _last_train_accuracy(r)) for _, r in groups]
  if all(acc is not None for _, acc in learned):
    text += (" Teacher-forced train token accuracy at the last logged step: " +
             ", ".join(f"{label} {sweep.pct(acc)}" for label, acc in learned) +
             " (how far each point got within the budget).")
  return text + sweep.failed_note(rows)


def _last_train_accuracy(row):
  train = [h for h in row.get("history", []) if h.get("split") == "train" and "accuracy" in h]
  return train[-1]["accuracy"] if train else None


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
