"""Loss variants: `<pad>` counted or ignored, and the seeds' class weighting.

The seeds' "loss adventures": counting `<pad>` targets in the loss penalises the model for its
padding and gives a misleading loss; ignoring `<pad>` treats the digits and `<eos>` equally;
weighting digit 9 x2 and `<eos>`/`<pad>` x0.5 "did not learn when to stop". Stopping is
measured by the outputs that never emit `<eos>` (no eos) and those that read a different
number of digits than the line has (wrong length). The test loss is each run's own training
loss on the test split, so it counts `<pad>` exactly where training did.
"""

from experiments import sweep

WEIGHTS = "9:2,eos:0.5,pad:0.5"  # The seeds' weighting, in the command-line form.


def conclusion(rows):
  by = {r["label"]: r for r in sweep.ok_rows(rows)}
  parts = []
  for label, r in by.items():
    parts.append(f"{label}: exact match {sweep.pct(r['test_exact_match'])}, "
                 f"{r['test_wrong_length']} wrong lengths and {r['test_no_eos']} without "
                 f"<eos> of {r['test_num_examples']}")
  text = "Measured: " + "; ".join(parts) + ". "
  base, counted = by.get("pad ignored"), by.get("pad counted")
  if base and counted:
    lower = counted["test_exact_match"] < base["test_exact_match"]
    text += (f"Counting <pad> gives a test loss of {counted['test_loss']:.3f} against "
             f"{base['test_loss']:.3f} when it is ignored, for "
             f"{'a lower' if lower else 'an equal or higher'} exact match "
             f"({sweep.pct(counted['test_exact_match'])} against "
             f"{sweep.pct(base['test_exact_match'])}): the easy <pad> positions are averaged "
             "into the loss, so it is not comparable with the other runs', which is what made "
             "it misleading. ")
  weighted = by.get("weighted, pad ignored")
  if base and weighted:
    worse = weighted["test_wrong_length"] > base["test_wrong_length"]
    text += ("With the class weighting the model "
             + ("stops at the wrong place more often" if worse
                else "does not stop at the wrong place more often")
             + f" ({weighted['test_wrong_length']} wrong lengths against "
             f"{base['test_wrong_length']} unweighted, {weighted['test_no_eos']} against "
             f"{base['test_no_eos']} never stopping)")
    text += (", so the seeds' 'did not learn when to stop' "
             + ("shows here too." if worse and weighted["test_no_eos"] >= base["test_no_eos"]
                else "does not reproduce with this model and budget (likely because every "
                     "line still has one <eos> target: halving its weight slows learning to "
                     "stop but does not prevent it)."))
  return text + sweep.failed_note(rows)


SWEEP = sweep.Sweep(
    name="loss",
    title="Loss variants: <pad> counted or ignored, class weighting",
    question=__doc__.split("\n", 2)[2],
    base="experiment",
    grid={
        "pad ignored": {"loss.ignore_pad": True, "loss.class_weights": ""},
        "pad counted": {"loss.ignore_pad": False, "loss.class_weights": ""},
        "weighted, pad ignored": {"loss.ignore_pad": True, "loss.class_weights": WEIGHTS},
        "weighted, pad counted": {"loss.ignore_pad": False, "loss.class_weights": WEIGHTS},
    },
    columns=("test_exact_match", "test_cer", "test_loss", "test_no_eos", "test_wrong_length",
             "test_exact_match_length_8", "test_read_length_8"),
    bars=("test_exact_match", "test_token_accuracy", "test_cer"),
    conclusion=conclusion,
)
