"""Position encoding: none, sinusoidal, learned and rotary (RoPE), in encoder and decoder.

Attention itself is blind to order: without positions the encoder's patch tokens are a set,
so the reader can find the digits but not their order, which is the seeds' "731 != 137". The
order errors count the outputs that read the right digits in another order; the wrong
lengths and exact match show what else each encoding costs. The same kind is used in the
encoder (over the patch sequence) and in the decoder (over the output positions). Every point
trains with positions 0..t-1 (`model.random_positions=False`, as in evaluation): randomized
positions need a decoder encoding, so 'none' could not have them, and the points then differ
in the encoding alone.
"""

from experiments import sweep

KINDS = ("none", "sinusoidal", "learned", "rope")


def conclusion(rows):
  done = sweep.ok_rows(rows)
  listing = "; ".join(f"{r['label']}: {sweep.pct(r['test_exact_match'])} exact, "
                      f"{r['test_order_errors']} order errors" for r in done)
  top = sweep.best(done, "test_exact_match")
  text = f"Measured: {listing} (of {done[0]['test_num_examples']} test lines). "
  by = {r["label"]: r for r in done}
  none = by.get("none")
  if none:
    others = [r for r in done if r is not none]
    most = max((r["test_order_errors"] for r in others), default=0)
    if none["test_order_errors"] > most:
      text += (f"Without positions the reader makes {none['test_order_errors']} order errors, "
               f"more than any encoding ({most} at most): it reads the digits but loses their "
               "order, the seeds' 731 != 137. ")
    else:
      text += (f"Without positions the reader makes {none['test_order_errors']} order errors, "
               f"no more than with an encoding ({most} at most): order reaches the model "
               "another way here. ")
  text += f"The best encoding here is {top['label']} ({sweep.pct(top['test_exact_match'])})."
  return text + sweep.failed_note(rows)


SWEEP = sweep.Sweep(
    name="position",
    title="Position encodings and order errors",
    question=__doc__.split("\n", 2)[2],
    base="experiment",
    grid={kind: {"model.encoder_position": kind, "model.decoder_position": kind}
          for kind in KINDS},
    fixed={"model.random_positions": False, "model.random_encoder_positions": False},
    columns=("test_exact_match", "test_cer", "test_order_errors", "test_wrong_length",
             "test_no_eos", "test_token_accuracy", "train_images_per_second"),
    bars=("test_exact_match", "test_token_accuracy", "test_cer"),
    conclusion=conclusion,
)
