"""Pre-LN against post-LN blocks.

The original Transformer normalises after each residual addition (post-LN); most modern
Transformers, ViT included, normalise the input of each sub-layer (pre-LN), which keeps the
residual path an identity and trains more stably at higher learning rates. Both run the
default recipe (peak learning rate 1.5e-3 after 200 warm-up steps, gradient clipping at 1).
"""

from experiments import sweep


def _first_validation(row):
  """Validation exact match at the first periodic evaluation: how fast learning starts."""
  return next((h["exact_match"] for h in row["history"]
               if h["split"] == "validation" and "exact_match" in h), float("nan"))


def conclusion(rows):
  by = {r["label"]: r for r in rows}
  pre, post = by["pre-LN"], by["post-LN"]
  if pre["status"] != "ok" or post["status"] != "ok":
    return "The two cannot be compared." + sweep.failed_note(rows)
  diff = 100 * (pre["test_exact_match"] - post["test_exact_match"])
  if diff > 1:
    verdict = "Pre-LN is the better choice here."
  elif diff >= -1:
    verdict = "With warm-up and gradient clipping post-LN keeps up at this depth."
  else:
    verdict = "Post-LN does better here, at this depth and with warm-up and clipping."
  return (f"Pre-LN reaches {sweep.pct(pre['test_exact_match'])} test exact match and post-LN "
          f"{sweep.pct(post['test_exact_match'])} ({diff:+.1f} points for pre-LN). At the first "
          f"validation they read {sweep.pct(_first_validation(pre))} and "
          f"{sweep.pct(_first_validation(post))} of the validation lines exactly. " + verdict)


SWEEP = sweep.Sweep(
    name="norm",
    title="Pre-LN against post-LN",
    question=__doc__.split("\n", 2)[2],
    base="experiment",
    grid={"pre-LN": {"model.norm": "pre"}, "post-LN": {"model.norm": "post"}},
    conclusion=conclusion,
)
