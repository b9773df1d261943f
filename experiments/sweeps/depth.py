"""Encoder depth: 1, 2, 4 and 6 encoder blocks (the decoder keeps 2).

The seeds' "chain of encoder teams": each block refines what the previous one understood.
Depth costs parameters and time linearly; the question is how much reading accuracy each
added block buys at an equal number of steps.
"""

from experiments import sweep


def conclusion(rows):
  done = sorted(sweep.ok_rows(rows), key=lambda r: r["varied"]["model.encoder_layers"])
  exact = [r["test_exact_match"] for r in done]
  top = sweep.best(done, "test_exact_match")
  listing = ", ".join(f"{r['label']} {sweep.pct(r['test_exact_match'])} "
                      f"({r.get('train_images_per_second', 0):,.0f} images/s, "
                      f"{r['num_params'] / 1e6:.2f} M parameters)" for r in done)
  text = (f"Test exact match by encoder depth: {listing}. It "
          f"{sweep.trend(exact, tolerance=0.01)} with depth and is best at {top['label']}. ")
  if len(done) >= 2:
    gains = [f"{b['label']}: {100 * (b['test_exact_match'] - a['test_exact_match']):+.1f} points"
             for a, b in zip(done, done[1:])]
    text += "Each step deeper adds " + ", ".join(gains) + "."
  return text + sweep.failed_note(rows)


SWEEP = sweep.Sweep(
    name="depth",
    title="Encoder depth",
    question=__doc__.split("\n", 2)[2],
    base="experiment",
    grid={f"{n} block{'s' * (n > 1)}": {"model.encoder_layers": n} for n in (1, 2, 4, 6)},
    scatter=(("train_images_per_second", "test_exact_match"),),
    conclusion=conclusion,
)
