"""The token vocabulary contract (see DESIGN.md) and conversions to and from digit strings.

Digits 0-9 are tokens 0-9, then `<sos>`=10, `<eos>`=11, `<pad>`=12. A target sequence is laid
out as `[<sos>, d1, ..., dn, <eos>, <pad>, ...]` with length `max_digits + 2`. The decoder
reads the sequence without its last token and is trained to predict it without its first,
so the model's raw output for "101" is `[1, 0, 1, <eos>, <pad>, ...]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

NUM_DIGITS = 10
SOS = 10
EOS = 11
PAD = 12
VOCAB_SIZE = 13
TOKEN_NAMES = tuple(str(d) for d in range(NUM_DIGITS)) + ("<sos>", "<eos>", "<pad>")
# The optional CTC head (models/reader.py) scores the digits, keeping their ids, and a blank.
CTC_BLANK = NUM_DIGITS
CTC_CLASSES = NUM_DIGITS + 1


def sequence_length(max_digits: int) -> int:
  """Length of a full target sequence: `<sos>`, up to `max_digits` digits, `<eos>`."""
  return max_digits + 2


def encode_digits(digits: str, max_digits: int) -> np.ndarray:
  """Digit string -> full target sequence.

  Args:
    digits: a string of 1..max_digits characters '0'-'9'; leading zeros are kept.
    max_digits: the longest line the model reads.

  Returns:
    tokens: int32 [max_digits + 2], `[<sos>, d1..dn, <eos>, <pad>...]`.
  """
  if not isinstance(digits, str) or not digits.isdigit() or not digits.isascii():
    raise ValueError(f"expected a non-empty string of digits 0-9, got {digits!r}")
  if len(digits) > max_digits:
    raise ValueError(
        f"{digits!r} has {len(digits)} digits but max_digits is {max_digits}; "
        "raise max_digits in the config or shorten the string")
  tokens = np.full((sequence_length(max_digits),), PAD, dtype=np.int32)
  tokens[0] = SOS
  tokens[1:1 + len(digits)] = [int(c) for c in digits]
  tokens[1 + len(digits)] = EOS
  return tokens


def encode_batch(batch: Iterable[str], max_digits: int) -> np.ndarray:
  """Many digit strings -> int32 [batch, max_digits + 2]."""
  return np.stack([encode_digits(d, max_digits) for d in batch])


def split_decoder_io(tokens):
  """Full sequences [..., L] -> (decoder inputs [..., L-1], targets [..., L-1])."""
  return tokens[..., :-1], tokens[..., 1:]


@dataclasses.dataclass(frozen=True)
class Reading:
  """What a model output says.

  Attributes:
    digits: the digits before the first `<eos>` (non-digit tokens there are skipped).
    ended: whether an `<eos>` was emitted; False means the output ran to its maximum length
      without deciding to stop, and `digits` holds everything it wrote.
    well_formed: ended, and nothing but digits before the `<eos>`.
  """
  digits: str
  ended: bool
  well_formed: bool


def read_output(tokens: Sequence[int] | np.ndarray) -> Reading:
  """A model's raw output (no `<sos>`, e.g. `[1, 0, 1, 11, 12, 12]`) -> Reading("101", ...)."""
  digits = []
  clean = True
  for t in np.asarray(tokens).reshape(-1).tolist():
    if t == EOS:
      return Reading("".join(digits), ended=True, well_formed=clean)
    if 0 <= t < NUM_DIGITS:
      digits.append(str(t))
    else:
      clean = False
  return Reading("".join(digits), ended=False, well_formed=False)


def read_outputs(tokens: np.ndarray) -> list[Reading]:
  """[batch, length] raw outputs -> one Reading each."""
  return [read_output(row) for row in np.asarray(tokens)]


def decode_sequence(tokens: Sequence[int] | np.ndarray) -> str:
  """A full target sequence (with `<sos>`) -> its digit string."""
  tokens = np.asarray(tokens).reshape(-1)
  if tokens.size and tokens[0] == SOS:
    tokens = tokens[1:]
  return read_output(tokens).digits
