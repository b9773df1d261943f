"""predict: image normalisation (polarity, crop, fit, stroke width), file errors, one compiled
decoder for many files, attention maps, and the command line."""

import csv
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import chex
import numpy as np
import pytest
from PIL import Image, ImageDraw

from digit_vit import calibration, decode, predict, preprocess, trained
from digit_vit.data import buckets, sources, wild
from digit_vit.models import tokens

H, W = 32, 192
ROOT = pathlib.Path(__file__).resolve().parent.parent
# What TensorFlow's C++ logging writes to stderr on import, before any of the program's lines.
TF_NATIVE_LOG = re.compile(r"[IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog")


def _line(height=300, width=900, ink=255, paper=0, box=(100, 150, 700, 260), pen=12):
  """A synthetic line: two strokes forming a wide box of ink on paper, uint8 [height, width]."""
  image = Image.new("L", (width, height), paper)
  ImageDraw.Draw(image).rectangle(box, outline=ink, width=pen)
  return np.asarray(image)


def _ink_box(canvas, threshold=0.35):
  rows, cols = np.nonzero(canvas >= threshold)
  return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


# ---- Normalisation


def test_a_line_keeps_its_natural_width_at_the_training_height():
  canvas = preprocess.to_canvas(_line(), H, W)
  # The ink, 601 x 111 pixels, scaled to 23 high is 125 wide; with a margin of 8 pixels a side
  # (MARGIN of the height), 141, rounded up to the multiple of 8: 144 of the widest 192.
  chex.assert_shape(canvas, (H, 144))
  assert canvas.dtype == np.float32 and canvas.min() == 0.0 and canvas.max() == pytest.approx(1)
  top, bottom, left, right = _ink_box(canvas)
  height, width = bottom - top, right - left
  assert abs(height - preprocess.LINE_HEIGHT * H) <= 1.5
  # The aspect ratio survives the fit (to a pixel).
  assert width / height == pytest.approx(601 / 111, rel=0.08)
  assert abs((top + bottom) / 2 - H / 2) <= 1 and abs((left + right) / 2 - 144 / 2) <= 1
  assert left >= preprocess.MARGIN * H and 144 - right >= preprocess.MARGIN * H


def test_a_line_too_long_for_the_widest_bucket_is_shrunk_to_it():
  """The documented strategy for a line wider than every bucket: it is fitted into the widest,
  margins kept, at a smaller digit height than the training lines'."""
  canvas = preprocess.to_canvas(_line(height=100, width=4000, box=(10, 20, 3990, 80), pen=6), H, W)
  chex.assert_shape(canvas, (H, W))
  top, bottom, left, right = _ink_box(canvas)
  margin = preprocess.MARGIN * H
  assert right - left >= W - 2 * margin - 2 and bottom - top < preprocess.LINE_HEIGHT * H - 4


def test_polarity_is_detected_and_colour_is_accepted():
  bright = preprocess.to_canvas(_line(ink=255, paper=0), H, W)
  dark = preprocess.to_canvas(_line(ink=0, paper=255), H, W)
  np.testing.assert_allclose(dark, bright, atol=1 / 255)
  # Blue ink on yellow paper, as RGB uint8, and as float RGB in [0, 1].
  mask = _line() > 0
  rgb = np.where(mask[..., None], np.uint8([20, 30, 160]), np.uint8([240, 230, 120]))
  np.testing.assert_allclose(preprocess.to_canvas(rgb, H, W), bright, atol=0.02)
  np.testing.assert_allclose(preprocess.to_canvas(rgb / 255.0, H, W), bright, atol=0.02)


def test_grey_ink_on_grey_paper_is_stretched_to_full_contrast():
  faint = preprocess.to_canvas(_line(ink=150, paper=90), H, W)
  np.testing.assert_allclose(faint, preprocess.to_canvas(_line(), H, W), atol=0.02)


@pytest.mark.parametrize("dark_ink", [False, True])
def test_unevenly_lit_noisy_paper_leaves_only_the_ink(dark_ink):
  # Paper brightening by 0.3 from left to right under ink of contrast 0.4, with pixel noise: a
  # single paper brightness left the bright side as a grey box and the noise stretched the crop.
  rng = np.random.default_rng(0)
  mask = _line() > 0
  paper = 0.2 + np.linspace(0.0, 0.3, mask.shape[1])[None, :] + rng.normal(0, 0.04, mask.shape)
  page = paper + 0.4 * mask
  page = 1.0 - page if dark_ink else page
  canvas = preprocess.to_canvas(np.clip(page, 0, 1), H, W)
  clean = preprocess.to_canvas(_line(), H, W)
  chex.assert_equal_shape([canvas, clean])
  np.testing.assert_allclose(_ink_box(canvas), _ink_box(clean), atol=1)  # Within a pixel.
  # Two pixels or more from the clean line's ink, the paper is black: no grey box, no specks.
  far = preprocess.grey_dilation(clean, (5, 5)) == 0
  assert far.mean() > 0.5 and (canvas[far] > 0).mean() < 0.01


def test_paper_brightness_follows_the_lighting_not_the_ink():
  mask = _line(pen=40) > 0  # Heavy strokes: a block may be mostly ink.
  lighting = np.linspace(0.1, 0.4, mask.shape[1], dtype=np.float32)[None, :].repeat(300, 0)
  paper = preprocess.paper_brightness(lighting + 0.5 * mask)
  np.testing.assert_allclose(paper, lighting, atol=0.05)
  # The 3x3 mean that decides the ink: a pixel of noise drops to a ninth, a stroke stays.
  speck = np.zeros((9, 9), np.float32)
  speck[4, 4] = 1.0
  assert preprocess.box_mean3(speck).max() == pytest.approx(1 / 9)
  stroke = np.zeros((9, 9), np.float32)
  stroke[:, 3:6] = 1.0
  assert preprocess.box_mean3(stroke)[4, 4] == pytest.approx(1.0)


@pytest.mark.parametrize("fill", [0, 128, 255])
def test_images_without_ink_give_no_canvas(fill):
  assert preprocess.to_canvas(np.full((40, 90), fill, np.uint8), H, W) is None
  noise = np.random.default_rng(0).integers(fill // 2, fill // 2 + 20, (40, 90), np.uint8)
  assert preprocess.to_canvas(noise, H, W) is None


def test_thin_strokes_are_thickened_to_training_width():
  thin = _line(height=1200, width=3600, box=(400, 600, 2800, 1040), pen=2)
  assert preprocess.stroke_width(thin / 255.0) == pytest.approx(2, abs=0.5)
  canvas = preprocess.to_canvas(thin, H, W)
  # Without thickening a 2-pixel pen shrunk ~19x would leave faint sub-pixel lines.
  assert preprocess.stroke_width(canvas) >= preprocess.STROKE_WIDTH - 1
  assert (canvas >= 0.9).sum() >= 100


def test_an_elongated_strip_is_refused_before_any_per_pixel_work(tmp_path):
  # 2 x 1.6M pixels, 6 KB as PNG: fitting it dilated every column with a window of 21k pixels
  # (80 s); it cannot hold a readable line, so it is refused from its size alone.
  strip = np.zeros((2, 1_600_000), np.uint8)
  strip[:, ::5000] = 255
  Image.fromarray(strip).save(tmp_path / "strip.png")
  assert (tmp_path / "strip.png").stat().st_size < 20_000
  with pytest.raises(preprocess.ImageError, match=r"strip.png: 1600000x2 pixels is more elongated "
                     r"than 200:1, too thin for a readable line of digits; crop it"):
    preprocess.load_image(tmp_path / "strip.png")
  with pytest.raises(preprocess.ImageError, match="more elongated than 200:1"):
    preprocess.to_canvas(strip.T, H, W)
  # At the limit an image is read (a 120 x 24000 one here).
  assert preprocess.to_canvas(_hairline(), H, W) is not None


def _hairline():
  """A 1-pixel line of ink across a 120 x 24000 image: a crop 24000 times as wide as high."""
  return np.pad(np.full((1, 24000), 255, np.uint8), ((60, 59), (0, 0)))


@pytest.fixture
def dilation_and_erosion_sizes(monkeypatch):
  """Records (pixels, window) of every grey dilation and (pixels, None) of every binary erosion
  that `to_canvas` runs, and fails at once on one beyond the canvas-bound limit rather than
  running it: for a 16 x 48 canvas, at most (2 * 8)^2 times its 768 pixels (pooled to at most
  twice preprocess.WORKING_SCALE = 8 times the canvas), a window under 5 * 8."""
  limit, seen = (2 * 8) ** 2 * 16 * 48, []
  dilation, erosion = preprocess.grey_dilation, preprocess.binary_erosion

  def grey_dilation(x, size):
    seen.append((x.size, max(size)))
    assert x.size <= limit and max(size) < 5 * 8, (x.shape, size)
    return dilation(x, size)

  def binary_erosion(mask):
    seen.append((mask.size, None))
    assert mask.size <= limit, mask.shape
    return erosion(mask)

  monkeypatch.setattr(preprocess, "grey_dilation", grey_dilation)
  monkeypatch.setattr(preprocess, "binary_erosion", binary_erosion)
  return seen


def test_strokes_are_measured_and_thickened_at_a_working_resolution(dilation_and_erosion_sizes):
  thin = _line(height=1200, width=3600, box=(400, 600, 2800, 1040), pen=2)
  # The crop, 448 x 2408 (the ink's 441 x 2401 and its antialiased rim, which the 3x3 mean that
  # decides the ink reaches), is 60 times its 7 x 40 on the canvas: pooled by 7 to 64 x 344 (it
  # used to be measured and dilated whole, 1.06M pixels with a window of 130).
  canvas = preprocess.to_canvas(thin, 16, 48)
  assert dilation_and_erosion_sizes == [(64 * 344, None), (64 * 344, 21)]
  assert preprocess.stroke_width(canvas) >= preprocess.STROKE_WIDTH - 0.5
  top, bottom, left, right = _ink_box(canvas)
  assert (right - left) / (bottom - top) == pytest.approx(2401 / 441, rel=0.1)
  # The hairline, 1 x 24000: a window of 19 over 1 x 320 pooled pixels (it was 1,304 over
  # 24,000), and still a bright line across the line's 40 pixels between its margins.
  dilation_and_erosion_sizes.clear()
  canvas = preprocess.to_canvas(_hairline(), 16, 48)
  assert dilation_and_erosion_sizes == [(320, None), (320, 19)]
  top, bottom, left, right = _ink_box(canvas)
  assert right - left == 40 and canvas.max() == pytest.approx(1)


@pytest.mark.parametrize("pen", [2, 48])
def test_pooling_to_the_working_resolution_keeps_the_canvas(monkeypatch, pen):
  line = _line(height=1200, width=3600, box=(400, 600, 2800, 1040), pen=pen)
  pooled = preprocess.to_canvas(line, 16, 48)
  monkeypatch.setattr(preprocess, "WORKING_SCALE", 10 ** 6)  # Never pool: the full-size reference.
  full = preprocess.to_canvas(line, 16, 48)
  assert _ink_box(pooled) == _ink_box(full)
  np.testing.assert_allclose(pooled, full, atol=0.1)
  assert np.abs(pooled - full).mean() < 0.01


# ---- Files


def test_load_image_reads_png_jpeg_bmp_and_transparency(tmp_path):
  line = _line(ink=0, paper=255)
  for suffix in ("png", "jpg", "bmp"):
    Image.fromarray(line).convert("RGB").save(tmp_path / f"a.{suffix}")
    grey = preprocess.load_image(tmp_path / f"a.{suffix}")
    assert grey.shape == line.shape and grey.dtype == np.uint8
    assert np.abs(grey.astype(int) - line).mean() < 3
  # Black strokes on a transparent canvas (as drawing apps export) read as black on white.
  rgba = np.zeros(line.shape + (4,), np.uint8)
  rgba[..., 3] = 255 - line
  Image.fromarray(rgba).save(tmp_path / "t.png")
  with open(tmp_path / "t.png", "rb") as f:
    np.testing.assert_array_equal(preprocess.load_image(f.read()), line)


def test_bad_files_raise_errors_naming_them(tmp_path):
  (tmp_path / "notes.txt").write_text("not an image")
  Image.fromarray(_line()).save(tmp_path / "whole.png")
  (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:200])
  cases = {"missing.png": "no such file", "notes.txt": "not a readable image",
           "cut.png": "cannot decode"}
  for name, why in cases.items():
    with pytest.raises(preprocess.ImageError, match=why) as error:
      preprocess.load_image(tmp_path / name)
    assert name in str(error.value)
  with pytest.raises(preprocess.ImageError, match="more than the 1,000 accepted"):
    preprocess.load_image(tmp_path / "whole.png", max_pixels=1000)


class _ScriptedReader:
  """Stands in for `predict.Reader` where the model does not matter: prepares images as the
  reader does (on a 16 x 48 canvas), reads every canvas with ink as `outputs` (5 tokens), and
  logs each call."""
  height, width, batch_size = 16, 48, 2

  def __init__(self, outputs=(1, 0, 1, tokens.EOS, tokens.PAD)):
    self.outputs, self.log = np.array(outputs), []

  def prepare(self, images):
    self.log.append(("prepare", len(images)))
    return [preprocess.to_canvas(i, self.height, self.width) for i in images]

  def read(self, images, *, attention=False, filenames=None):
    return self.read_prepared(self.prepare(images), attention=attention, filenames=filenames)

  def read_prepared(self, canvases, *, attention=False, filenames=None):
    assert not attention
    self.log.append(("read", list(filenames)))
    reading = tokens.read_output(self.outputs)
    return [predict._no_ink(n, self.height, len(self.outputs)) if c is None else
            predict.Prediction(filename=n, tokens=self.outputs.tolist(), digits=reading.digits,
                               confidence=float(np.exp(-0.25)), log_prob=-0.25, canvas=c,
                               truncated=not reading.ended)
            for n, c in zip(filenames, canvases)]


def test_read_files_loads_one_image_at_a_time_and_reads_a_batch_at_a_time(tmp_path,
                                                                          monkeypatch):
  for name, image in [("a.png", _line()), ("blank.png", np.zeros((30, 60), np.uint8)),
                      ("c.png", _line(ink=0, paper=255)), ("d.png", _line(pen=4))]:
    Image.fromarray(image).save(tmp_path / name)
  (tmp_path / "b.png").write_text("not a png")
  reader, load_image = _ScriptedReader(), preprocess.load_image

  def logged_load_image(path):
    reader.log.append(("load", path.name))
    return load_image(path)

  monkeypatch.setattr(predict, "load_image", logged_load_image)
  predictions = predict.read_files(reader, [str(tmp_path)])
  assert [(p.filename, p.error is None, p.no_ink, p.digits) for p in predictions] == [
      ("a.png", True, False, "101"), ("b.png", False, False, ""),
      ("blank.png", True, True, ""), ("c.png", True, False, "101"),
      ("d.png", True, False, "101")]
  assert "b.png: not a readable image" in predictions[1].error
  # Each image is prepared as soon as it is loaded (only its canvas is kept), and a batch is
  # read once it holds batch_size = 2 canvases with ink.
  assert reader.log == [
      ("load", "a.png"), ("prepare", 1), ("load", "b.png"), ("load", "blank.png"),
      ("prepare", 1), ("load", "c.png"), ("prepare", 1), ("read", ["a.png", "blank.png", "c.png"]),
      ("load", "d.png"), ("prepare", 1), ("read", ["d.png"])]


def test_a_reading_that_never_ends_is_flagged_as_truncated(tmp_path, capsys):
  # The command prints it, warns on stderr and says so in the CSV.
  Image.fromarray(_line()).save(tmp_path / "line.png")
  out = tmp_path / "readings.csv"
  predict.run(_ScriptedReader(outputs=[4, 2, 4, 2, 4]), [str(tmp_path / "line.png")],
              output=str(out))
  printed = capsys.readouterr()
  assert printed.out.endswith(
      "digits=42424  confidence=0.7788  tokens=[4, 2, 4, 2, 4]  (truncated: no <eos> within 5 "
      "tokens)\n")
  assert printed.err == (f"warning: {tmp_path / 'line.png'}: the reading reached the decoder's "
                         f"maximum of 5 tokens without <eos>; the line may hold more digits "
                         f"than the 5 read\n")
  predict.run(_ScriptedReader(), [str(tmp_path / "line.png")], output=str(tmp_path / "ok.csv"))
  printed = capsys.readouterr()
  assert printed.err == "" and printed.out.endswith("tokens=[1, 0, 1, 11, 12]\n")
  for path, digits, truncated in [(out, "42424", "true"), (tmp_path / "ok.csv", "101", "false")]:
    with open(path) as f:
      assert list(csv.reader(f)) == [
          ["filename", "digits", "confidence", "truncated", "rejected"],
          [str(tmp_path / "line.png"), digits, "0.778801", truncated, "false"]]
  # The reader's own Prediction says so from the raw outputs.
  never_ends = predict._prediction("x.png", np.array([4, 2, 4, 2, 4]), -3.0, None, None)
  assert never_ends.truncated and never_ends.digits == "42424"
  ended = predict._prediction("y.png", np.array([4, 2, tokens.EOS, tokens.PAD, tokens.PAD]),
                              -1.0, None, None)
  assert not ended.truncated and ended.digits == "42"


def test_min_confidence_marks_rejected_readings_and_still_exits_0(tmp_path, capsys):
  Image.fromarray(_line()).save(tmp_path / "line.png")
  Image.fromarray(np.zeros((30, 60), np.uint8)).save(tmp_path / "blank.png")
  out = tmp_path / "readings.csv"
  # The scripted reading's confidence is exp(-0.25) = 0.7788; an image with no ink's is 1.
  predictions = predict.run(_ScriptedReader(), [str(tmp_path)], output=str(out),
                            min_confidence=0.8)
  assert [(p.filename, p.rejected) for p in predictions] == [("blank.png", False),
                                                             ("line.png", True)]
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].endswith("(no ink)")
  assert printed[1].endswith("tokens=[1, 0, 1, 11, 12]  (rejected: confidence below 0.8)")
  with open(out) as f:
    assert [(r["filename"], r["rejected"]) for r in csv.DictReader(f)] == [
        ("blank.png", "false"), ("line.png", "true")]
  assert predict._finish(predictions) == 0  # Rejections are readings, not failures.
  kept = predict.run(_ScriptedReader(), [str(tmp_path / "line.png")], min_confidence=0.75)
  assert not kept[0].rejected and "rejected" not in capsys.readouterr().out
  with pytest.raises(ValueError, match=r"min_confidence must be in \[0, 1\], got 1.5"):
    predict.check_min_confidence(1.5)


def test_unwritable_outputs_are_found_before_reading(tmp_path):
  (tmp_path / "file.txt").write_text("")
  check = predict.check_output_paths
  assert check(str(tmp_path / "new.csv"), str(tmp_path / "maps" / "deeper")) is None
  assert check(str(tmp_path / "file.txt"), str(tmp_path)) is None
  assert check(None, None) is None
  assert check(str(tmp_path), None) == (
      f"--output={tmp_path} is a directory: give a file's path in it")
  assert check(str(tmp_path / "no" / "x.csv"), None) == (
      f"--output={tmp_path / 'no' / 'x.csv'}: there is no directory {tmp_path / 'no'}; create "
      f"it first")
  for maps in (tmp_path / "file.txt", tmp_path / "file.txt" / "maps"):
    assert check(None, str(maps)) == (
        f"--attention={maps}: {tmp_path / 'file.txt'} is a file; give a directory for the maps")


@pytest.mark.slow
def test_command_line_mistakes_are_one_line_and_exit_status_2(tiny_workdir, tmp_path):
  Image.fromarray(_line()).save(tmp_path / "line.png")
  (tmp_path / "file.txt").write_text("")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  image = str(tmp_path / "line.png")
  # A wrong run; and unwritable outputs beside a good run, found before it loads and reads
  # (they used to fail after reading every image); evaluate shares the convention.
  cases = [
      (["digit_vit.predict", f"--workdir={tmp_path / 'no_run'}", image],
       f"error: {tmp_path / 'no_run' / 'config.json'} not found"),
      (["digit_vit.predict", f"--workdir={tiny_workdir}", image, "--output=/nonexistent/x.csv"],
       "error: --output=/nonexistent/x.csv: there is no directory /nonexistent"),
      (["digit_vit.predict", f"--workdir={tiny_workdir}", image,
        f"--attention={tmp_path / 'file.txt'}"], f"error: --attention={tmp_path / 'file.txt'}"),
      (["digit_vit.predict", f"--workdir={tiny_workdir}", image, "--min_confidence=1.5"],
       "error: flag --min_confidence=1.5: expected a probability in [0, 1]"),
      (["digit_vit.evaluate", f"--workdir={tmp_path / 'no_run'}"],
       f"error: {tmp_path / 'no_run' / 'config.json'} not found"),
  ]
  for args, start in cases:
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2, (args, result.stderr[-2000:])
    # Importing TensorFlow (evaluate) logs a few lines of its own from C++ first.
    lines = [line for line in result.stderr.splitlines() if not TF_NATIVE_LOG.match(line)]
    assert result.stdout == "" and len(lines) == 1, (args, result.stderr)
    assert lines[0].startswith(start), (args, result.stderr)


# ---- Reading with a trained model


def _test_lines(workdir, n):
  """n test-split lines of the tiny run: uint8 images (ink bright) and their digits."""
  from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
  config = predict.load_config(workdir)
  batch = next(input_pipeline.eval_iterator(config, "test", batch_size=n))
  images = np.uint8(np.round(batch["image"][..., 0] * 255))
  return images, [tokens.decode_sequence(t) for t in batch["tokens"]]


@pytest.fixture(scope="module")
def reader(tiny_workdir):
  return predict.Reader(tiny_workdir, batch_size=8)


def _padded(reader, images):
  """The reader's canvases of `images` in one batch padded to the bucket of the widest, and
  their widths: the input a decoder reference reads."""
  canvases = reader.prepare(images)
  widths = np.array([c.shape[1] for c in canvases], np.int32)
  width = reader.buckets[int(buckets.bucket_index(widths, reader.buckets).max())]
  batch = np.zeros((len(canvases), reader.height, width, 1), np.float32)
  for i, c in enumerate(canvases):
    batch[i, :, :c.shape[1], 0] = c
  return batch, widths


def test_reader_obeys_the_token_contract_with_one_compilation_a_bucket(reader, tiny_workdir):
  images, _ = _test_lines(tiny_workdir, 20)
  predictions = reader.read(list(images), attention=True)
  widths = [p.canvas.shape[1] for p in predictions]
  used = set(buckets.bucket_index(widths, reader.buckets).tolist())
  assert reader.traces == len(used)  # 20 images in batches of 8: one compilation a bucket.
  max_length = reader.max_length  # decode.max_length digits and the <eos>.
  assert max_length == reader.config.decode.max_length + 1 > reader.config.max_digits + 1
  patch_h, patch_w = reader.model_config.patch_size
  for p in predictions:
    assert len(p.tokens) == max_length and p.canvas.shape[1] % 8 == 0
    assert p.digits == tokens.read_output(p.tokens).digits and not p.no_ink
    assert 0 < p.confidence <= 1 and p.confidence == pytest.approx(np.exp(p.log_prob))
    ended = tokens.EOS in p.tokens
    chex.assert_shape(p.attention, (len(p.digits) + 1 if ended else max_length, 16,
                                    p.canvas.shape[1]))
    # Each token's attention is a distribution over the line's patches (none on the padding),
    # spread over their pixels.
    np.testing.assert_allclose(p.attention.sum(axis=(1, 2)), patch_h * patch_w, rtol=1e-4)
    overlay = predict.attention_overlay(p, scale=4)
    assert overlay.height == len(p.attention) * (16 * 4 + 4) - 4
    assert overlay.width > p.canvas.shape[1] * 4
  reader.read(list(images[:3]))
  assert reader.traces == len(used)


def test_reading_a_line_padded_into_a_wider_bucket_reads_the_same(reader, tiny_workdir):
  images, _ = _test_lines(tiny_workdir, 8)
  batch, widths = _padded(reader, list(images))
  narrow, narrow_log_prob, _, _ = reader._read_batch(reader.params, (), batch, widths)
  wide_batch = np.zeros(batch.shape[:2] + (reader.buckets[-1] * 2,) + batch.shape[3:], np.float32)
  wide_batch[:, :, :batch.shape[2]] = batch
  model_config = dataclasses.replace(reader.model_config, image_width=reader.buckets[-1] * 2)
  wide, wide_log_prob = decode.decode(model_config, reader.params, wide_batch, widths=widths,
                                      max_length=reader.max_length,
                                      temperature=reader.temperature)
  np.testing.assert_array_equal(np.asarray(narrow), np.asarray(wide))
  np.testing.assert_allclose(narrow_log_prob, wide_log_prob, rtol=1e-4, atol=1e-5)


def test_a_twelve_digit_line_goes_end_to_end_through_predict(reader, tmp_path):
  """Past the tiny run's 3 training digits and its 48-pixel widest bucket: the line is fitted
  into the widest bucket and read up to decode.max_length digits, every token in contract."""
  digits = sources.load_digits("embedded", "test", validation_per_class=40)
  style = dataclasses.replace(wild.STYLES["long"], lengths=(12,))
  image = wild.compose(digits.images[:12], np.random.default_rng(0), style)
  Image.fromarray(image).save(tmp_path / "twelve.png")
  (p,) = predict.read_files(reader, [str(tmp_path / "twelve.png")])
  assert p.error is None and p.canvas.shape == (16, reader.buckets[-1])
  assert len(p.tokens) == reader.max_length == 17
  reading = tokens.read_output(p.tokens)
  assert p.truncated == (not reading.ended) and p.digits == reading.digits
  # After the first <eos>, only <pad>.
  if reading.ended:
    assert set(p.tokens[len(p.digits) + 1:]) <= {tokens.PAD}


def test_reader_reads_the_same_line_in_any_polarity_size_and_format(reader, tiny_workdir):
  images, _ = _test_lines(tiny_workdir, 8)
  big = [np.asarray(Image.fromarray(i).resize((i.shape[1] * 5, 16 * 5), Image.BILINEAR))
         for i in images]
  same = [list(images), [255 - i for i in images], [np.stack([255 - i] * 3, -1) for i in images]]
  canvases = [reader.prepare(v) for v in same]
  for other in canvases[1:]:
    for a, b in zip(canvases[0], other):
      np.testing.assert_allclose(a, b, atol=1.5 / 255)
  readings = [[p.tokens for p in reader.read(v)] for v in same]
  assert readings[1] == readings[0] == readings[2]
  # Five times the size: the same line up to resampling (its rounded width may take the next
  # multiple of 8).
  for a, b in zip(canvases[0], reader.prepare(big)):
    assert a.shape[0] == b.shape[0] and abs(a.shape[1] - b.shape[1]) <= 8
    box_a, box_b = _ink_box(a), _ink_box(b)
    assert abs((box_a[1] - box_a[0]) - (box_b[1] - box_b[0])) <= 1
    assert abs((box_a[3] - box_a[2]) - (box_b[3] - box_b[2])) <= 2


def test_blank_images_read_as_empty_without_running_the_model(reader):
  before = reader.traces
  (p,) = reader.read([np.full((50, 50), 255, np.uint8)])
  assert p.no_ink and p.digits == "" and p.tokens[0] == tokens.EOS
  assert reader.traces == before


def test_read_files_keeps_going_past_bad_files(reader, tiny_workdir, tmp_path):
  images, _ = _test_lines(tiny_workdir, 2)
  Image.fromarray(images[0]).save(tmp_path / "a.png")
  (tmp_path / "b.txt").write_text("hello")
  Image.fromarray(255 - images[1]).convert("RGB").save(tmp_path / "c.jpg")
  predictions = predict.read_files(
      reader, [str(tmp_path / "a.png"), str(tmp_path / "b.txt"), str(tmp_path / "nope.png"),
               str(tmp_path / "c.jpg")])
  assert [p.error is None for p in predictions] == [True, False, False, True]
  assert "b.txt" in predictions[1].error and "nope.png" in predictions[2].error
  assert predictions[0].tokens == reader.read([images[0]])[0].tokens


@pytest.mark.slow
def test_command_line_prints_writes_csv_and_maps_and_fails_on_bad_files(tiny_workdir, tmp_path):
  images, _ = _test_lines(tiny_workdir, 3)
  folder = tmp_path / "lines"
  (folder / "sub").mkdir(parents=True)
  Image.fromarray(images[0]).save(folder / "one.png")
  Image.fromarray(255 - images[1]).save(folder / "sub" / "two.bmp")
  Image.fromarray(np.full((30, 60), 255, np.uint8)).save(folder / "blank.png")
  (folder / "broken.png").write_text("not a png")
  (folder / "readme.md").write_text("ignored: not an image suffix")
  Image.fromarray(images[2]).save(tmp_path / "three.jpg")
  out, maps = tmp_path / "readings.csv", tmp_path / "maps"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "digit_vit.predict", f"--workdir={tiny_workdir}", str(folder),
       str(tmp_path / "three.jpg"), str(tmp_path / "missing.png"), f"--output={out}",
       f"--attention={maps}", "--min_confidence=0.9999"], capture_output=True, text=True,
      cwd=ROOT, env=env, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "broken.png" in result.stderr and "missing.png" in result.stderr
  assert "2 of 6 file(s) could not be read" in result.stderr
  lines = {line.split()[0]: line for line in result.stdout.splitlines() if "tokens=[" in line}
  assert set(lines) == {"blank.png", "one.png", "sub/two.bmp", str(tmp_path / "three.jpg")}
  assert "(no ink)" in lines["blank.png"]
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert [r["filename"] for r in rows] == ["blank.png", "one.png", "sub/two.bmp",
                                           str(tmp_path / "three.jpg")]
  for row in rows:
    assert f"digits={row['digits'] or '-'} " in lines[row["filename"]]
    assert 0 < float(row["confidence"]) <= 1
    assert row["truncated"] == ("true" if "(truncated: " in lines[row["filename"]] else "false")
    # Every reading of the tiny model is far from certain; an image with no ink is certain.
    rejected = row["filename"] != "blank.png"
    assert row["rejected"] == ("true" if rejected else "false")
    assert ("(rejected: confidence below 0.9999)" in lines[row["filename"]]) == rejected
  assert (maps / "one.png.attention.png").is_file()
  assert (maps / "sub" / "two.bmp.attention.png").is_file()
  assert not (maps / "blank.png.attention.png").exists()
  # A run that cannot be loaded is a usage error naming it, not a traceback.
  bad = subprocess.run(
      [sys.executable, "-m", "digit_vit.predict", f"--workdir={tiny_workdir}",
       f"--ensemble={tmp_path / 'no_run'}", str(folder)],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert f"{tmp_path / 'no_run' / 'config.json'} not found" in bad.stderr


def test_reader_confidence_is_calibrated_by_the_run_and_marks_rejections(reader, tiny_workdir):
  temperature = calibration.load_temperature(tiny_workdir)
  assert reader.temperature == temperature and temperature != 1.0  # Training fitted one.
  images, _ = _test_lines(tiny_workdir, 8)
  predictions = reader.read(list(images))
  for p in predictions:
    # The confidence is the tempered product over the written tokens, <eos> included.
    written = calibration.written_mask(np.array([p.tokens]))[0]
    assert p.confidence == pytest.approx(np.prod(np.array(p.token_probs)[written]), rel=1e-4)
    assert np.array(p.token_probs)[~written] == pytest.approx(1.0)
    assert calibration.line_log_probs(p.step_log_probs[None], np.array([p.tokens]),
                                      temperature)[0] == pytest.approx(p.log_prob, abs=1e-4)
    untempered = calibration.line_log_probs(p.step_log_probs[None], np.array([p.tokens]))[0]
    assert abs(untempered - p.log_prob) > 1e-3
  confidences = sorted(p.confidence for p in predictions)
  threshold = (confidences[3] + confidences[4]) / 2
  marked = reader.read(list(images), min_confidence=threshold)
  assert [p.rejected for p in marked] == [p.confidence < threshold for p in predictions]
  assert sum(p.rejected for p in marked) == 4 and not any(p.rejected for p in predictions)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    reader.read(list(images[:1]), min_confidence=-0.5)


def test_reader_with_test_time_views_reads_as_the_decoder_does(tiny_workdir):
  reader = predict.Reader(tiny_workdir, batch_size=8, views=3)
  assert (reader.beam_size, reader.views) == (1, 3)
  images, _ = _test_lines(tiny_workdir, 8)
  predictions = reader.read(list(images))
  batch, widths = _padded(reader, list(images))
  want, log_prob = decode.decode(reader.model_config, reader.params, batch, widths=widths,
                                 views=3, max_length=reader.max_length,
                                 temperature=reader.temperature)
  assert [p.tokens for p in predictions] == np.asarray(want).tolist()
  np.testing.assert_allclose([p.log_prob for p in predictions], log_prob, rtol=1e-4, atol=1e-5)


def test_reader_with_an_ensemble_reads_as_the_decoder_does(tiny_workdir):
  reader = predict.Reader(tiny_workdir, checkpoint="latest", batch_size=8,
                          ensemble=[f"{tiny_workdir}@20"])
  assert reader.ensemble == [{"workdir": str(tiny_workdir), "checkpoint": "20", "step": 20}]
  assert reader.temperature == 1.0  # The run's temperature was fitted to its model alone.
  earlier, _ = trained.restore_params(tiny_workdir, reader.config, 20)
  images, _ = _test_lines(tiny_workdir, 8)
  predictions = reader.read(list(images), attention=True)
  batch, widths = _padded(reader, list(images))
  want, log_prob = decode.decode((reader.model_config, reader.model_config),
                                 (reader.params, earlier), batch, widths=widths,
                                 max_length=reader.max_length)
  assert [p.tokens for p in predictions] == np.asarray(want).tolist()
  np.testing.assert_allclose([p.log_prob for p in predictions], log_prob, rtol=1e-4, atol=1e-5)
  # The attention maps are the first model's, on the ensemble's reading.
  attention = np.asarray(predict.cross_attention(reader.model_config, reader.params, batch,
                                                 widths, want))
  for p, maps in zip(predictions, attention):
    np.testing.assert_allclose(p.attention, maps[:len(p.attention), :, :p.canvas.shape[1]],
                               rtol=1e-4, atol=1e-6)
  _, alone_log_prob = decode.decode(reader.model_config, reader.params, batch, widths=widths,
                                    max_length=reader.max_length)
  # The second model changed the readings' probabilities.
  assert np.abs(np.asarray(alone_log_prob) - np.asarray(log_prob)).max() > 1e-3
  with pytest.raises(ValueError, match="use 'best', 'latest' or a step number"):
    predict.Reader(tiny_workdir, ensemble=[f"{tiny_workdir}@newest"])
