import numpy as np
import pytest

from digit_vit.models import tokens

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count


def test_vocabulary_contract():
  assert (tokens.SOS, tokens.EOS, tokens.PAD, tokens.VOCAB_SIZE) == (10, 11, 12, 13)
  assert tokens.TOKEN_NAMES[10:] == ("<sos>", "<eos>", "<pad>")


def test_round_trip_keeps_leading_zeros():
  seq = tokens.encode_digits("0731", max_digits=8)
  np.testing.assert_array_equal(seq, [10, 0, 7, 3, 1, 11, 12, 12, 12, 12])
  assert seq.dtype == np.int32
  assert tokens.decode_sequence(seq) == "0731"


@pytest.mark.parametrize("digits", ["1111", "707", "0", "00000000", "12345678"])
def test_round_trip(digits):
  seq = tokens.encode_digits(digits, max_digits=8)
  assert tokens.decode_sequence(seq) == digits
  _, targets = tokens.split_decoder_io(seq)
  reading = tokens.read_output(targets)
  assert reading == tokens.Reading(digits, ended=True, well_formed=True)


def test_decoder_io_is_a_shift():
  seq = tokens.encode_digits("101", max_digits=4)
  inputs, targets = tokens.split_decoder_io(seq)
  np.testing.assert_array_equal(inputs, [10, 1, 0, 1, 11])
  np.testing.assert_array_equal(targets, [1, 0, 1, 11, 12])  # the demo's raw output


def test_read_stops_at_first_eos():
  assert tokens.read_output([1, 0, 1, 11, 12, 12]).digits == "101"
  assert tokens.read_output([4, 11, 5, 11]).digits == "4"


def test_output_without_eos_is_read_to_the_end_and_flagged():
  reading = tokens.read_output([3, 1, 4, 1, 5])
  assert reading.digits == "31415"
  assert not reading.ended and not reading.well_formed


def test_non_digit_before_eos_is_skipped_and_flagged():
  reading = tokens.read_output([3, 12, 4, 11])
  assert reading == tokens.Reading("34", ended=True, well_formed=False)


def test_batch_helpers():
  batch = tokens.encode_batch(["1", "22"], max_digits=2)
  np.testing.assert_array_equal(batch, [[10, 1, 11, 12], [10, 2, 2, 11]])
  readings = tokens.read_outputs(batch[:, 1:])
  assert [r.digits for r in readings] == ["1", "22"]


@pytest.mark.parametrize("bad", ["", "12a", "１２", "-1", 12])
def test_bad_strings_are_rejected(bad):
  with pytest.raises(ValueError, match="digits"):
    tokens.encode_digits(bad, max_digits=8)


def test_too_long_names_the_fix():
  with pytest.raises(ValueError, match="max_digits"):
    tokens.encode_digits("123", max_digits=2)
