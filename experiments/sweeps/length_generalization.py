"""Length generalisation: trained on lines of 1-6 digits, evaluated on 1-8.

`configs/length_generalization.py` trains the default reader (5,000 steps) on the 1-6 digit
lines of the train split only; validation and test keep all lengths, so exact match on 7 and
8 digits measures generalisation to longer lines, and the mean number of digits read on them
shows whether the reader stops too early. A reference point trains on 1-8 digits. The
decoder's position encoding is varied, because that is where a sequence longer than any seen
in training meets positions it was not trained at: with positions 0..t-1, learned embeddings
of output positions 7 and 8 never receive a gradient (their targets are `<pad>`, ignored by
the loss), while sinusoidal and rotary encodings are defined at every position. Under the
default's randomized positions (`model.random_positions`, which every point keeps), a line's
tokens take sorted positions drawn from all `model.max_length`, so the 1-6 digit lines train
every position of every encoding.

The committed results of this sweep were measured before randomized positions and width
buckets (experiments/results/measured_by_earlier_code.json): positions 0..t-1 on a 32x192
canvas.
"""

from experiments import sweep


def _mean_exact(row, lengths):
  values = [row[f"test_exact_match_length_{n}"] for n in lengths
            if f"test_exact_match_length_{n}" in row]
  return sum(values) / len(values) if values else float("nan")


def conclusion(rows):
  done = sweep.ok_rows(rows)
  # The lengths trained on and the unseen ones, from the resolved configs.
  limited = [r for r in done if r["config"]["data"]["train_max_digits"]]
  longest = done[0]["config"]["max_digits"]
  trained = limited[0]["config"]["data"]["train_max_digits"] if limited else longest
  unseen = list(range(trained + 1, longest + 1))
  parts = []
  for r in done:
    out = ", ".join(f"{n} digits {sweep.pct(r.get(f'test_exact_match_length_{n}'))} "
                    f"(reads {r.get(f'test_read_length_{n}', float('nan')):.2f})"
                    for n in unseen)
    parts.append(f"{r['label']}: 1-{trained} digits "
                 f"{sweep.pct(_mean_exact(r, range(1, trained + 1)))} on average; {out}")
  text = "Test exact match by length (mean digits read): " + "; ".join(parts) + ". "
  if limited and unseen:
    n = unseen[-1]
    reads = [r.get(f"test_read_length_{n}", float("nan")) for r in limited]
    exact = [r.get(f"test_exact_match_length_{n}", 0.0) for r in limited]
    if max(exact) < 0.05 and max(reads) < n - 0.5:
      text += (f"Trained on at most {trained} digits, no variant reads {n}-digit lines: they "
               f"stop after {min(reads):.1f}-{max(reads):.1f} digits on average, so the "
               "reader has learnt to end a line by the longest length it saw rather than "
               "where the ink ends. ")
    elif max(exact) < 0.05:
      text += (f"Trained on at most {trained} digits, no variant reads {n}-digit lines "
               f"exactly although they write {min(reads):.1f}-{max(reads):.1f} digits on "
               "average: they go on past the trained lengths but get the extra digits wrong. ")
    else:
      top = max(limited, key=lambda r: r.get(f"test_exact_match_length_{n}", 0.0))
      text += (f"Some {n}-digit lines are read: {top['label']} gets "
               f"{sweep.pct(top.get(f'test_exact_match_length_{n}'))} of them. ")
  return text + sweep.failed_note(rows)


SWEEP = sweep.Sweep(
    name="length_generalization",
    title="Length generalisation: train on 1-6 digits, test on 7-8",
    question=__doc__.split("\n", 2)[2],
    base="length_generalization",
    grid={
        "train 1-8 (reference)": {"data.train_max_digits": 0},
        "learned": {"model.decoder_position": "learned"},
        "sinusoidal": {"model.decoder_position": "sinusoidal"},
        "rope": {"model.decoder_position": "rope"},
    },
    # Quick: the tiny 1-3 digit lines, trained on 1-2 digits.
    quick={**sweep.QUICK_OVERRIDES, "data.train_max_digits": 2},
    quick_grid={
        "train 1-3 (reference)": {"data.train_max_digits": 0},
        "learned": {"model.decoder_position": "learned"},
        "sinusoidal": {"model.decoder_position": "sinusoidal"},
        "rope": {"model.decoder_position": "rope"},
    },
    columns=("test_exact_match", "test_exact_match_length_6", "test_exact_match_length_7",
             "test_exact_match_length_8", "test_read_length_7", "test_read_length_8",
             "test_wrong_length", "test_no_eos"),
    quick_columns=("test_exact_match", "test_exact_match_length_2", "test_exact_match_length_3",
                   "test_read_length_3", "test_wrong_length", "test_no_eos"),
    conclusion=conclusion,
)
