"""The `wild` and `long` file splits (data/wild.py) and their evaluation (file_evaluation.py)."""

import csv
import dataclasses

import numpy as np
import pytest

from digit_vit import calibration, file_evaluation, predict, preprocess
from digit_vit.data import sources, wild
from digit_vit.models import tokens


@pytest.fixture(scope="module")
def test_digits():
  return sources.load_digits("embedded", "test", validation_per_class=40)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_lines")
  return {split: wild.build(split, root, size=24) for split in wild.SPLITS}


def _rows(folder):
  with open(folder / wild.LABELS_FILE, newline="") as f:
    return list(csv.DictReader(f))


def test_generation_is_deterministic_and_seeded(test_digits):
  first = list(wild.generate("wild", test_digits, 6, seed=0))
  again = list(wild.generate("wild", test_digits, 6, seed=0))
  other = list(wild.generate("wild", test_digits, 6, seed=1))
  for (a, ta, ia), (b, tb, ib) in zip(first, again):
    np.testing.assert_array_equal(a, b)
    assert ta == tb and list(ia) == list(ib)
  assert [t for _, t, _ in first] != [t for _, t, _ in other]


@pytest.mark.parametrize("split, lengths", [("wild", range(1, 9)), ("long", range(9, 17))])
def test_lengths_are_balanced_and_labels_match_the_digits(built, split, lengths):
  rows = _rows(built[split])
  assert len(rows) == 24
  assert [len(r["digits"]) for r in rows[:8]] == list(lengths)
  embedded_labels = sources.load_embedded_all()[1]
  for row in rows:
    ids = np.array([int(i) for i in row["source_ids"].split()])
    assert len(ids) == len(row["digits"])
    # Every digit is a test-only digit (rows 400-499 of a class block), and the label is its own.
    assert sources.is_test_id("embedded", ids).all()
    assert "".join(str(int(embedded_labels[i])) for i in ids) == row["digits"]


def test_wild_lines_vary_in_size_and_polarity(built):
  shapes, dark_paper = [], []
  for path, _ in wild.load_labels(built["wild"]):
    image = preprocess.load_image(path)
    shapes.append(image.shape)
    dark_paper.append(np.median(image) < 128)
  heights = [h for h, _ in shapes]
  assert max(heights) > 3 * min(heights)  # Any size, not one canvas.
  assert len(set(shapes)) == len(shapes)
  assert 0 < sum(dark_paper) < len(dark_paper)  # Both light ink on dark and dark on light.


def test_long_lines_are_wider_than_the_default_canvas(built):
  # The ink of a long line is wider than the default 32x192 canvas's aspect on most lines: a
  # fixed canvas must shrink it below the training lines' digit height.
  aspects = []
  for path, _ in wild.load_labels(built["long"]):
    image = preprocess.load_image(path).astype(np.float32)
    ink = np.abs(image - np.median(image)) > 60
    rows, cols = np.nonzero(ink)
    aspects.append((cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1))
  assert np.median(aspects) > 192 / 32


def test_thinning_never_erases_a_digit(test_digits):
  style = dataclasses.replace(wild.STYLES["wild"], stroke=(0.5, 0.5), rotation=0.0)
  rng = np.random.default_rng(0)
  for digit in test_digits.images[::100]:
    glyph = wild._render_digit(digit, 20.0, rng, style, slant=0.0, stroke=0.5)
    assert glyph.shape[0] == 20 and glyph.max() > 0.3


def test_a_built_split_is_reused_and_named_by_its_settings(tmp_path, built):
  folder = wild.build("long", tmp_path, size=3)
  mtime = (folder / wild.LABELS_FILE).stat().st_mtime_ns
  assert wild.build("long", tmp_path, size=3) == folder
  assert (folder / wild.LABELS_FILE).stat().st_mtime_ns == mtime
  assert wild.build("long", tmp_path, size=3, seed=1) != folder
  assert not list(tmp_path.glob("*.partial-*"))
  with pytest.raises(ValueError, match="unknown evaluation split"):
    wild.build("tame", tmp_path)


class _ScriptedReader:
  """Reads each line as `answer(label)`, found by the image it is given."""
  batch_size = 4

  def __init__(self, folder, answer):
    self.by_image = {preprocess.load_image(p).tobytes(): text for p, text in wild.load_labels(folder)}
    self.answer = answer

  def read(self, images):
    out = []
    for image in images:
      text = self.answer(self.by_image[np.asarray(image).tobytes()])
      out.append(predict.Prediction(tokens=[int(c) for c in text] + [tokens.EOS]))
    return out


def test_evaluate_split_scores_what_the_reader_reads(built):
  folder = built["long"]
  perfect = file_evaluation.evaluate_split(_ScriptedReader(folder, lambda t: t), folder)
  assert perfect["exact_match"] == 1.0 and perfect["cer"] == 0.0
  assert perfect["num_examples"] == 24 and perfect["truncated"] == 0
  assert perfect["exact_match_length_16"] == 1.0 and perfect["read_length_12"] == 12.0
  # Dropping the last digit: no line exact, one edit per line.
  short = file_evaluation.evaluate_split(_ScriptedReader(folder, lambda t: t[:-1]), folder,
                                         num_examples=10)
  digits = sum(len(t) for _, t in wild.load_labels(folder)[:10])
  assert short["num_examples"] == 10 and short["exact_match"] == 0.0
  assert short["cer"] == pytest.approx(10 / digits)
  assert short["wrong_length"] == 10


def test_a_trained_reader_reads_the_files_through_predict(tiny_workdir, built):
  reader = predict.Reader(tiny_workdir, batch_size=8)
  result, lines = file_evaluation.evaluate_split_with_lines(reader, built["wild"],
                                                            num_examples=12)
  assert result["num_examples"] == 12
  assert 0.0 <= result["exact_match"] <= 1.0 and result["cer"] >= 0.0
  # The lines' readings, for the confidence figures: the verdicts the metrics counted, and
  # the reader's own (calibrated) confidences.
  assert lines.correct.shape == (12,) and lines.correct.mean() == result["exact_match"]
  again = reader.read([preprocess.load_image(p) for p, _ in wild.load_labels(built["wild"])[:12]])
  np.testing.assert_array_equal(lines.tokens, [p.tokens for p in again])
  np.testing.assert_allclose(calibration.confidences(lines, reader.temperature),
                             [p.confidence for p in again], rtol=1e-4)
  # The tiny model reads at most max_length tokens, so a 16-digit line cannot be read whole.
  long_result = file_evaluation.evaluate_split(reader, built["long"], num_examples=8)
  assert long_result["exact_match"] == 0.0
  assert all(long_result[f"read_length_{n}"] <= reader.model_config.max_length
             for n in range(9, 17))


def test_evaluate_reads_the_file_splits_of_a_run(tiny_workdir):
  from digit_vit import evaluate  # pylint: disable=import-outside-toplevel
  result = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test", "wild", "long"],
                             num_examples=16)
  assert result["splits"] == ["test", "wild", "long"]
  assert result["wild_num_examples"] == result["long_num_examples"] == 16
  assert result["test_num_examples"] == 16
  for split in ("wild", "long"):
    assert 0.0 <= result[f"{split}_exact_match"] <= 1.0 and result[f"{split}_cer"] >= 0.0
  # Each split's confidence figures, under a temperature fitted on 16 validation lines.
  assert result["temperature"] > 0 and result["calibration"]["validation_examples"] == 16
  for split in ("test", "wild", "long"):
    for key in ("coverage_at_98", "coverage_at_99", "ece", "ece_calibrated"):
      assert 0.0 <= result[f"{split}_{key}"] <= 1.0, (split, key)
  assert result["long_coverage_at_98"] == 0.0  # No 16-digit line can be read whole.
  # The long lines have 9-12 digits among their first 16 (lengths cycle over 9-16).
  assert {f"long_exact_match_length_{n}" for n in range(9, 17)} <= set(result)
  with pytest.raises(ValueError, match="choose among"):
    evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["tame"])


@pytest.mark.slow
def test_training_reports_the_file_splits(tmp_path, eval_lines_dir):
  from digit_vit import config_lib, train  # pylint: disable=import-outside-toplevel
  config = config_lib.load("tiny")
  config.data.data_dir = str(tmp_path / "data")
  config.data.eval_lines_dir = eval_lines_dir  # Shared, built once: not under data_dir.
  assert file_evaluation.split_root(config) == eval_lines_dir
  config.num_train_steps, config.eval_every_steps = 10, 0
  config.eval_splits = ("test", "long")
  report = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert report["long_num_examples"] == wild.DEFAULT_SIZES["long"]
  assert report["test_num_examples"] == 100
  # Read by the run's last parameters, as `evaluate` reads them from its checkpoint.
  again = file_evaluation.evaluate(predict.Reader(tmp_path / "run", checkpoint="latest",
                                                  batch_size=64), config, "long")
  for key in ("exact_match", "cer", "wrong_length", "truncated"):
    assert report[f"long_{key}"] == pytest.approx(again[key]), key
