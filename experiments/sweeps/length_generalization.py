"""Length generalisation: trained on lines of 1-6 digits, evaluated on 1-12.

`configs/length_generalization.py` trains the default reader (5,000 steps) on the 1-6 digit
lines of the train split only; validation and test keep every length up to 12, so exact match
and CER on 7-12 digits measure generalisation to longer lines, and the mean number of digits
read on them shows whether the reader stops where the ink ends or where its training lines
did. The issue's target: the CER on 7-12-digit lines at most twice the CER on 1-6-digit lines.

The decoder's positions are where a sequence longer than any seen in training meets positions
it was not trained at. With positions 0..t-1 (`model.random_positions=False`), learned
embeddings past the 7th output never receive a gradient, and `<eos>` always comes by the 7th
output. Under the default's randomized positions (Ruoss et al. 2023), a line's tokens take
sorted positions drawn from all `model.max_length`, so the 1-6 digit lines train every
position, and no position tells the decoder how far along the line it is. RoPE in the decoder
is the relative alternative. Reading the encoder's columns with the CTC head (trained jointly,
`decode.reader='ctc'`) needs no decoder position at all. A reference point trains on 1-12
digits. The encoder's columns are RoPE in every point, so wider lines than any trained on
meet only distances between columns.

The committed results of the earlier version of this sweep (positions 0..t-1 on a fixed 32x192
canvas, tested on 1-8 digits) are in experiments/results/measured_by_earlier_code.json and
docs/results.md.
"""

from experiments import sweep
from digit_vit import metrics


# The CTC head's columns read the line (best path), trained jointly with the decoder at equal
# weight; the decoder keeps the default's randomized positions.
CTC = {"model.ctc_head": True, "loss.ctc_weight": 1.0, "decode.reader": "ctc"}


def lengths(rows) -> tuple[range, range]:
  """The lengths trained on and the longer ones tested, from the points' resolved configs: 1-6
  and 7-12 in full mode, 1-2 and 3 in quick mode."""
  limited = [r["config"]["data"]["train_max_digits"] for r in rows
             if r["config"]["data"]["train_max_digits"]]
  longest = rows[0]["config"]["max_digits"]
  trained = limited[0] if limited else longest
  return range(1, trained + 1), range(trained + 1, longest + 1)


def cer_ratio(row, trained, unseen) -> float:
  """The CER on unseen lengths over the CER on trained ones (the target is at most 2; inf when
  the trained lengths are read without an error and the unseen ones are not)."""
  seen_cer = metrics.length_cer(row, trained, prefix="test_")
  unseen_cer = metrics.length_cer(row, unseen, prefix="test_")
  if seen_cer == 0:
    return 1.0 if unseen_cer == 0 else float("inf")
  return unseen_cer / seen_cer


def _span(lengths) -> str:
  return f"{lengths[0]}-{lengths[-1]}" if len(lengths) > 1 else f"{lengths[0]}"


def conclusion(rows):
  done = sweep.ok_rows(rows)
  if not done:
    return sweep.failed_note(rows)
  trained, unseen = lengths(done)
  if not unseen:
    return "No test line is longer than the training lines. " + sweep.failed_note(rows)
  first, longest = unseen[0], unseen[-1]
  parts = []
  for r in done:
    parts.append(
        f"{r['label']}: CER {sweep.pct(metrics.length_cer(r, trained, prefix='test_'))} on "
        f"{_span(trained)} digits, {sweep.pct(metrics.length_cer(r, unseen, prefix='test_'))} "
        f"on {_span(unseen)} (ratio {cer_ratio(r, trained, unseen):.2f}); exact match "
        f"{first} / {longest} digits {sweep.pct(r.get(f'test_exact_match_length_{first}'))} / "
        f"{sweep.pct(r.get(f'test_exact_match_length_{longest}'))}, digits read on "
        f"{longest}-digit lines {r.get(f'test_read_length_{longest}', float('nan')):.2f}")
  text = "On the test split: " + "; ".join(parts) + ". "
  limited = [r for r in done if r["config"]["data"]["train_max_digits"]]
  if limited:
    best = min(limited, key=lambda r: cer_ratio(r, trained, unseen))
    ratio = cer_ratio(best, trained, unseen)
    verdict = "meets" if ratio <= 2 else "misses"
    text += (f"Of the readers trained on {_span(trained)} digits, {best['label']} generalises "
             f"best: its CER ratio {ratio:.2f} {verdict} the target of at most 2. ")
  return text + sweep.failed_note(rows)


SWEEP = sweep.Sweep(
    name="length_generalization",
    title="Length generalisation: train on 1-6 digits, test on 7-12",
    question=__doc__.split("\n", 2)[2],
    base="length_generalization",
    grid={
        "randomized learned (default)": {},
        "learned 0..t-1": {"model.random_positions": False},
        "train 1-12 (reference)": {"data.train_max_digits": 0},
        "randomized rope": {"model.decoder_position": "rope"},
        "read by CTC": CTC,
    },
    # Quick: the tiny 1-3 digit lines, trained on 1-2 digits.
    quick={**sweep.QUICK_OVERRIDES, "data.train_max_digits": 2},
    quick_grid={  # configs/tiny.py keeps positions 0..t-1.
        "randomized learned (default)": {"model.random_positions": True},
        "learned 0..t-1": {},
        "train 1-3 (reference)": {"data.train_max_digits": 0, "model.random_positions": True},
        "randomized rope": {"model.decoder_position": "rope", "model.random_positions": True},
        "read by CTC": CTC,
    },
    columns=("test_exact_match", "test_exact_match_length_6", "test_exact_match_length_7",
             "test_exact_match_length_9", "test_exact_match_length_12", "test_cer_length_3",
             "test_cer_length_6", "test_cer_length_9", "test_cer_length_12",
             "test_read_length_12", "test_no_eos", "long_exact_match"),
    quick_columns=("test_exact_match", "test_exact_match_length_2", "test_exact_match_length_3",
                   "test_read_length_3", "test_wrong_length", "test_no_eos"),
    conclusion=conclusion,
)
