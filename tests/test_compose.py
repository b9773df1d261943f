"""The line composer (`compose.py`): natural widths, shrinking, and lines as people write them
(heights, touching and overlapping digits, alignment, slant, pens, blur, ink, noise)."""

import dataclasses

import numpy as np
import pytest

from digit_vit.data import compose, sources


@pytest.fixture(scope="module")
def digits():
  return sources.load_digits("embedded", "train", validation_per_class=40)


def _lines(digits, comp, n, seed=0, length=None):
  """n composed lines: (image uint8 [H, W, 1], bboxes [k, 4] in pixels)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    k = length or int(rng.integers(1, comp.max_digits + 1))
    image, boxes = compose.compose_line(digits.images[rng.integers(0, len(digits), k)], rng, comp)
    h, w = image.shape[:2]
    out.append((image, boxes * [h, w, h, w]))
  return out


def test_lines_are_as_wide_as_they_need(digits):
  comp = compose.Composition(height=32, width=512, max_digits=12)
  mean = {}
  for k in (1, 4, 12):
    widths = [image.shape[1] for image, _ in _lines(digits, comp, 40, seed=k, length=k)]
    assert all(w % compose.WIDTH_MULTIPLE == 0 and 8 <= w <= 512 for w in widths)
    mean[k] = np.mean(widths)
  assert 16 <= mean[1] <= 40 and mean[1] < mean[4] < mean[12]
  # Within 10% of the estimate the config check relies on (less the rounding up to 8).
  for k in (1, 4, 12):
    assert abs(mean[k] - 4 - compose.expected_width(k, comp)) < 0.1 * mean[k], (k, mean)


def test_lines_wider_than_the_widest_bucket_are_shrunk_to_fit(digits):
  comp = compose.Composition(height=32, width=64, max_digits=8)
  for image, boxes in _lines(digits, comp, 30, length=8):
    assert image.shape == (32, 64, 1)
    assert len(boxes) == 8 and (np.diff(boxes[:, 1]) > 0).all()  # all 8, left to right
    assert boxes[:, 3].max() <= 64


def test_neighbours_touch_and_overlap_by_at_most_max_overlap(digits):
  comp = compose.Composition(height=32, width=512, max_digits=8, min_gap=-0.5, max_gap=0.0,
                             max_overlap=0.25, max_slant=0.0, max_rotation=0.0)
  overlaps = []
  for _, boxes in _lines(digits, comp, 40, length=6):
    widths = boxes[:, 3] - boxes[:, 1]
    overlap = boxes[:-1, 3] - boxes[1:, 1]  # > 0: the next digit starts inside this one
    assert (overlap <= 0.25 * np.minimum(widths[:-1], widths[1:]) + 1.5).all()  # +rounding
    overlaps += (overlap / np.minimum(widths[:-1], widths[1:])).tolist()
  assert np.mean(np.array(overlaps) > 0.15) > 0.3  # and they do overlap, often


@pytest.mark.parametrize("align", ["bottom", "centre", "jitter"])
def test_alignment_of_a_line(digits, align):
  probs = {"bottom": (1.0, 0.0), "centre": (0.0, 1.0), "jitter": (0.0, 0.0)}[align]
  comp = compose.Composition(height=32, width=512, max_digits=8, bottom_prob=probs[0],
                             centre_prob=probs[1], vertical_jitter=0.15, scale_jitter=0.25)
  spreads = {"bottom": [], "centre": []}
  for _, boxes in _lines(digits, comp, 30, length=5):
    spreads["bottom"].append(np.ptp(boxes[:, 2]))
    spreads["centre"].append(np.ptp(boxes[:, 0] + boxes[:, 2]) / 2)
  if align == "jitter":
    assert np.median(spreads["centre"]) > 3 and np.median(spreads["bottom"]) > 3
  else:
    assert max(spreads[align]) <= 1.0  # one baseline / one centre line, up to rounding
    other = "centre" if align == "bottom" else "bottom"
    assert np.median(spreads[other]) > 1.5  # heights differ, so the other edge does not align


def test_digit_heights_vary_within_a_line(digits):
  comp = compose.Composition(height=64, width=1024, max_digits=8, scale_jitter=0.25,
                             max_scale=0.7)
  ratios = [np.ptp(b[:, 2] - b[:, 0]) / np.mean(b[:, 2] - b[:, 0])
            for _, b in _lines(digits, comp, 30, length=8)]
  assert 0.25 < np.median(ratios) < 0.6  # a +-25% spread, trimmed by the digits' own shapes


def test_slant_leans_the_top_to_the_right():
  bar = np.zeros((28, 28), np.uint8)
  bar[4:24, 13:15] = 255
  for slant, sign in ((0.4, 1), (-0.4, -1)):
    crop = np.asarray(compose._prepare_digit(bar, 0, 0.0, slant), np.float32)  # pylint: disable=protected-access
    cols = np.arange(crop.shape[1])
    top, bottom = crop[:3], crop[-3:]
    lean = (top.sum(0) @ cols / top.sum()) - (bottom.sum(0) @ cols / bottom.sum())
    # The bar's top and bottom rows are ~17 pixels apart: a 0.4 slant moves them ~7 apart.
    assert sign * lean > 4, (slant, lean)


def test_pens_from_hairline_to_heavy(digits):
  ink = [sum(np.asarray(compose._pen(d, stroke), np.float32).sum()  # pylint: disable=protected-access
             for d in digits.images[:50]) for stroke in (-1, 0, 1, 2)]
  # Hairline about 60% of the ink, thick about 190%, heavy about 230%.
  assert ink[0] < 0.7 * ink[1] and ink[1] * 1.5 < ink[2] < 0.9 * ink[3], ink


def test_rendering_as_predict_normalises_a_photograph(digits):
  base = compose.Composition(height=32, width=512, max_digits=8)
  noisy = dataclasses.replace(base, noise_prob=1.0, max_noise=0.1, blur_prob=0.0)
  faint = dataclasses.replace(base, faint_prob=1.0, min_ink=0.3, noise_prob=0.0, blur_prob=0.0)
  blurred = dataclasses.replace(base, blur_prob=1.0, noise_prob=0.0)
  for comp in (noisy, faint, blurred, base):
    for image, _ in _lines(digits, comp, 20):
      assert image.max() == 255  # stretched to peak 1
  for comp in (noisy, blurred):  # faint noise and the blur's skirt are cleared, as predict does
    values = np.concatenate([im.ravel() for im, _ in _lines(digits, comp, 20)])
    assert not ((values > 0) & (values < np.floor(compose.INK_FLOOR * 255))).any()
  # Noise leaves specks off the digits (which clean lines never have); faint lines have digits
  # well below the peak.
  def off_digits(comp):
    counts = []
    for image, boxes in _lines(digits, comp, 20, seed=1):
      off = np.ones(image.shape[:2], bool)
      for y0, x0, y1, x1 in np.round(boxes).astype(int):
        off[y0:y1, x0:x1] = False
      counts.append((image[..., 0][off] > 0).sum())
    return np.array(counts)
  assert (off_digits(dataclasses.replace(base, noise_prob=0.0, blur_prob=0.0)) == 0).all()
  assert (off_digits(noisy) > 0).mean() > 0.5
  peaks = []
  for image, boxes in _lines(digits, faint, 20, length=4):
    b = np.round(boxes).astype(int)
    peaks.append(min(image[y0:y1, x0:x1].max() for y0, x0, y1, x1 in b))
  assert np.median(peaks) < 0.8 * 255


def test_elastic_distortion_makes_new_shapes_of_the_train_digits_only(digits):
  comp = compose.Composition(height=32, width=512, max_digits=8)
  plain = compose._distort(digits.images[0], np.zeros((2, 4, 4)))  # pylint: disable=protected-access
  np.testing.assert_array_equal(plain, digits.images[0])  # no displacement, the digit as drawn
  # A uniform field of one pixel down moves the whole digit one row down.
  down = compose._distort(digits.images[0], np.stack([-np.ones((4, 4)), np.zeros((4, 4))]))  # pylint: disable=protected-access
  np.testing.assert_array_equal(down[1:], digits.images[0][:-1])
  rng = np.random.default_rng(0)
  moved = [compose._distort(d, rng.normal(0, 1.2, (2, 4, 4)))  # pylint: disable=protected-access
           for d in digits.images[:50]]
  assert all(not np.array_equal(m, d) for m, d in zip(moved, digits.images))
  # The same strokes, moved: about as much ink (within 10%).
  ink = [m.sum(dtype=np.float64) / d.sum(dtype=np.float64) for m, d in zip(moved, digits.images)]
  assert 0.9 < np.median(ink) < 1.1, ink
  elastic = dataclasses.replace(comp, digit_elastic=1.2)
  assert all(not np.array_equal(a[0], b[0]) for a, b in zip(_lines(digits, comp, 5),
                                                             _lines(digits, elastic, 5)))
  # Validation and test lines keep the digits as written; off, no random draws are added, so
  # lines without it are those of earlier dataset versions.
  assert elastic.training_only("train") is elastic
  assert elastic.training_only("test") == comp == comp.training_only("validation")


def test_the_widest_bucket_must_hold_the_longest_line():
  comp = compose.Composition(height=32, width=192, max_digits=8)
  compose.check_canvas(32, 192, 8, comp=comp)  # the default fits
  assert 200 < compose.expected_width(8, comp) < 210  # a typical line of 8 is shrunk a little
  compose.check_canvas(32, 160, 8, comp=comp)  # most 8-digit lines shrunk, within min_scale
  narrow = dataclasses.replace(comp, width=128)
  with pytest.raises(ValueError, match=r"the widest line, 128 pixels.*8 digits at height 32 are "
                                       r"about 206 pixels wide.*smaller than "
                                       r"config\.data\.min_scale; add a width bucket >= 208 "
                                       r"\(at least 160\).*config\.max_digits to <= 6"):
    narrow.validate()


def test_style_settings_out_of_range_say_which_field():
  comp = compose.Composition(height=32, width=192, max_digits=8)
  for change, field in ((dict(max_overlap=0.6), "max_overlap"), (dict(min_ink=0.0), "min_ink"),
                        (dict(bottom_prob=0.7, centre_prob=0.5), "bottom_prob, centre_prob"),
                        (dict(noise_prob=1.5), "noise_prob"), (dict(max_slant=0.8), "max_slant"),
                        (dict(max_margin=-1.0), "max_margin"), (dict(digit_elastic=5.0),
                                                                "digit_elastic")):
    with pytest.raises(ValueError, match=f"config.data.{field}"):
      dataclasses.replace(comp, **change).validate()
  with pytest.raises(ValueError, match=r"config\.image_width=196, must be a multiple of 8"):
    dataclasses.replace(comp, width=196).validate()
