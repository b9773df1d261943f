"""Attention heads: 1, 2, 4 and 8 heads at a fixed width of 128.

The seeds explain multi-head attention as specialists that each look at one aspect (colour,
action, size) before their views are concatenated; the single head is the seeds' first
implementation. At a fixed width the heads split the same 128 dimensions (128, 64, 32, 16 per
head), so parameters stay equal and only the number of separate attention patterns changes.
"""

from experiments import sweep


def conclusion(rows):
  done = sorted(sweep.ok_rows(rows), key=lambda r: r["varied"]["model.num_heads"])
  exact = [r["test_exact_match"] for r in done]
  top = sweep.best(done, "test_exact_match")
  listing = ", ".join(f"{r['label']} {sweep.pct(r['test_exact_match'])}" for r in done)
  spread = max(exact) - min(exact)
  text = (f"Test exact match by number of heads: {listing}; it "
          f"{sweep.trend(exact, tolerance=0.01)} with more heads, best at {top['label']}, a "
          f"spread of {100 * spread:.1f} points. ")
  text += ("More heads at the same width " + ("help" if exact[-1] > exact[0] + 0.01 else
                                               "do not help" if abs(exact[-1] - exact[0]) <= 0.01
                                               else "hurt")
           + f" here (1 head {sweep.pct(exact[0])} against {done[-1]['label']} "
           f"{sweep.pct(exact[-1])}); training speed goes "
           f"{done[0].get('train_images_per_second', 0):,.0f} -> "
           f"{done[-1].get('train_images_per_second', 0):,.0f} images/s.")
  return text + sweep.failed_note(rows)


SWEEP = sweep.Sweep(
    name="heads",
    title="Attention heads at a fixed width",
    question=__doc__.split("\n", 2)[2],
    base="experiment",
    grid={f"{h} head{'s' * (h > 1)}": {"model.num_heads": h} for h in (1, 2, 4, 8)},
    # The tiny model is 32 wide: 1-8 heads of 32-4 dimensions.
    conclusion=conclusion,
)
