"""error_analysis: readings charged to the source digits they misread, and the lines a
classifier's misread digits spoil."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from digit_vit import error_analysis, evaluate, metrics, trained
from digit_vit.data import input_pipeline
from digit_vit.models import tokens

ROOT = pathlib.Path(__file__).resolve().parent.parent
EOS, PAD = tokens.EOS, tokens.PAD


@pytest.mark.parametrize("truth, reading, read_as, insertions", [
    ("123", "123", ["1", "2", "3"], 0),
    ("123", "183", ["1", "8", "3"], 0),
    ("123", "13", ["1", "-", "3"], 0),
    ("12", "132", ["1", "2"], 1),
    ("45", "", ["-", "-"], 0),
    ("", "45", [], 2),
    ("1234", "2341", ["-", "2", "3", "4"], 1),
    ("11", "1", ["-", "1"], 0),  # A tie: the last 1 is kept (substitutions are preferred).
])
def test_align_puts_each_read_digit_against_a_true_one(truth, reading, read_as, insertions):
  assert error_analysis.align(truth, reading) == (read_as, insertions)


@pytest.mark.parametrize("truth, reading, gaps, charged", [
    ("12", "132", [1], [{0, 1}]),  # Neither neighbour misread: both are charged.
    ("07", "107", [0], [{0}]),  # Added before the first digit: only it is beside.
    ("34", "343", [2], [{1}]),
    ("808", "8138", [1], [{1}]),  # The 0 read '13': the misread neighbour alone.
    ("", "45", [0, 0], [set(), set()]),  # Nothing to charge on an empty line.
    ("5", "5", [], []),
])
def test_digits_added_are_charged_to_the_digits_beside_them(truth, reading, gaps, charged):
  read_as, found = error_analysis.alignment(truth, reading)
  assert (read_as, len(found)) == error_analysis.align(truth, reading)
  assert found == gaps
  assert error_analysis.beside_added(truth, read_as, found) == charged


def test_align_costs_the_edit_distance_the_metrics_compute():
  rng = np.random.default_rng(0)
  for _ in range(200):
    truth = "".join(rng.choice(list("0123"), rng.integers(0, 7)))
    reading = "".join(rng.choice(list("0123"), rng.integers(0, 7)))
    read_as, insertions = error_analysis.align(truth, reading)
    assert len(read_as) == len(truth)
    cost = sum(r != t for r, t in zip(read_as, truth)) + insertions
    pad = lambda s: np.array([[int(c) for c in s] + [PAD] * (8 - len(s))])  # noqa: E731
    expected = metrics.edit_distance(pad(truth), np.array([len(truth)]), pad(reading),
                                     np.array([len(reading)]))
    assert cost == int(expected[0]), (truth, reading, read_as)
    # What is kept in place is the reading's digits in order, with those added left out.
    assert len(reading) - insertions == sum(r != error_analysis.DROPPED for r in read_as)


def _outputs(*readings, length=5):
  """Raw outputs [n, length]: each reading's digits, <eos> (unless it ends with '...'), <pad>s."""
  rows = []
  for reading in readings:
    ended = not reading.endswith("...")
    row = [int(c) for c in reading.rstrip(".")] + ([EOS] if ended else [])
    rows.append(row + [PAD] * (length - len(row)))
  return np.array(rows, np.int32)


def _charged():
  truths = ["12", "34", "15", "31", "12", "4", "12"]
  source_ids = np.array([[10, 11, -1, -1], [12, 13, -1, -1], [10, 14, -1, -1],
                         [12, 10, -1, -1], [10, 15, -1, -1], [13, -1, -1, -1],
                         [16, 11, -1, -1]])
  outputs = _outputs("12", "39", "1", "31", "172", "7", "12...")
  return error_analysis.charge_lines(truths, outputs, source_ids)


def test_charge_lines_blames_the_source_digits_misread():
  errors = _charged()
  np.testing.assert_array_equal(errors.right, [True, False, False, True, False, False, False])
  assert errors.blamed == [frozenset(), {13}, {14}, frozenset(), frozenset(), {13},
                           frozenset()]
  # '12' read as '172' adds a digit; '12' without <eos> is not read either.
  np.testing.assert_array_equal(errors.unexplained, [0, 0, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(errors.insertions, [0, 0, 0, 0, 1, 0, 0])
  assert errors.occurrences == {10: 4, 11: 2, 12: 2, 13: 2, 14: 1, 15: 1, 16: 1}
  assert errors.added_beside == {10: 1, 15: 1}  # The 7 of '172' stands between them.
  assert errors.misread == {13: {"9": 1, "7": 1}, 14: {"-": 1}}
  assert errors.labels == {10: 1, 11: 2, 12: 3, 13: 4, 14: 5, 15: 2, 16: 1}
  assert errors.ranked() == [13, 14]
  # '34' read '39' misreads its second digit, '15' read '1' drops its second, '4' read '7'.
  expected_at = np.zeros((7, 4), bool)
  expected_at[1, 1] = expected_at[2, 1] = expected_at[5, 0] = True
  np.testing.assert_array_equal(errors.misread_at, expected_at)
  assert errors.exact_match_if_read_right([]) == pytest.approx(2 / 7)
  assert errors.exact_match_if_read_right([13]) == pytest.approx(4 / 7)
  assert errors.exact_match_if_read_right([13, 14]) == pytest.approx(5 / 7)


def test_summary_of_charged_lines():
  summary = error_analysis.summarize_lines(_charged(), top=1)
  assert summary["lines"] == 7 and summary["wrong_lines"] == 5
  assert summary["exact_match"] == pytest.approx(2 / 7)
  assert summary["unexplained_lines"] == 2 and summary["insertions"] == 1
  assert (summary["digits"], summary["misread_digits"], summary["misreadings"]) == (7, 2, 3)
  assert summary["exact_match_if_read_right"] == {"1": pytest.approx(4 / 7)}
  assert summary["exact_match_if_all_read_right"] == pytest.approx(5 / 7)
  assert summary["most_misread"] == [{"id": 13, "label": 4, "lines": 2, "misread": 2,
                                      "read_as": {"9": 1, "7": 1}}]
  assert summary["every_misread"] == {"13": {"9": 1, "7": 1}, "14": {"-": 1}}
  assert summary["added_beside"] == [{"id": 10, "label": 1, "lines": 4, "added": 1}]
  text = error_analysis.format_lines(summary, top=1)
  assert "7 lines, exact match 28.57%: 5 wrong, 2 of them with a digit added or no <eos>" in text
  assert "k=1: 57.14%, all: 71.43%" in text and "    13  4    2/2    9x1 7x1" in text
  assert "(else both neighbours): 1 more on one line each\n" in text


def test_the_digits_beside_digits_added_are_listed_most_charged_first():
  # Source digit 7, a 0, read as '13' and as '10'; digit 9 beside a digit added once.
  errors = error_analysis.charge_lines(["0", "0", "3", "45"], _outputs("13", "10", "3", "435"),
                                       np.array([[7, -1], [7, -1], [8, -1], [9, 6]]))
  assert errors.added_beside == {7: 2, 9: 1, 6: 1}
  summary = error_analysis.summarize_lines(errors, top=5)
  assert [(d["id"], d["added"], d["lines"]) for d in summary["added_beside"]] == [
      (7, 2, 2), (6, 1, 1), (9, 1, 1)]
  assert ("(else both neighbours): 7 (0) on 2 of 2 lines, 2 more on one line each\n"
          in error_analysis.format_lines(summary, top=5))


def test_digit_geometry_measures_heights_and_overlaps_on_the_canvas():
  # A canvas 100 px wide. Line 0: three digits, the first two overlapping by 5 px, the third
  # 10 px after the second. Line 1: one digit alone, then padding.
  bboxes = np.zeros((2, 3, 4))
  bboxes[0] = [[0.1, 0.00, 0.9, 0.30], [0.2, 0.25, 0.8, 0.50], [0.0, 0.60, 0.5, 0.80]]
  bboxes[1, 0] = [0.05, 0.4, 0.7, 0.6]
  height, overlap = error_analysis.digit_geometry(bboxes, np.array([3, 1]), width=100)
  np.testing.assert_allclose(height[0], [0.8, 0.6, 0.5])
  np.testing.assert_allclose(overlap[0], [5.0, 5.0, -10.0])  # The nearer neighbour counts.
  assert height[1, 0] == pytest.approx(0.65) and overlap[1, 0] == -np.inf
  assert np.isnan(height[1, 1:]).all() and np.isnan(overlap[1, 1:]).all()
  misread_at = np.array([[True, False, False], [True, False, False]])
  assert error_analysis.misread_by(height, misread_at, (0.0, 0.55, 0.7, np.inf)) == [
      {"from": 0.0, "to": 0.55, "digits": 1, "misread": 0.0},
      {"from": 0.55, "to": 0.7, "digits": 2, "misread": 0.5},
      {"from": 0.7, "to": None, "digits": 1, "misread": 1.0}]
  by_overlap = error_analysis.misread_by(overlap, misread_at, error_analysis.OVERLAP_BINS)
  # The lone digit and the one 10 px from its neighbour; the two overlapping by 5 px.
  assert [(r["from"], r["to"], r["digits"], r["misread"]) for r in by_overlap] == [
      (None, -4.0, 2, 0.5), (4.0, None, 2, 0.5)]
  summary = error_analysis.summarize_lines(
      error_analysis.charge_lines(["123", "4"], _outputs("723", "9"), np.array([[1, 2, 3],
                                                                                [4, -1, -1]])),
      top=1, bboxes=bboxes, lengths=np.array([3, 1]), width=100)
  assert summary["misread_by_overlap"] == by_overlap
  text = error_analysis.format_lines(summary, top=1)
  assert "by overlap with a neighbour: <-4 px 50.00% of 2, >=4 px 50.00% of 2\n" in text
  assert "by height (share of the canvas): [0, 0.6) 0.00% of 1, [0.6, 0.7) 50.00% of 2" in text


def test_charge_lines_checks_its_inputs():
  with pytest.raises(ValueError, match="one each per line"):
    error_analysis.charge_lines(["1"], _outputs("1", "2"), np.array([[3, -1]]))
  with pytest.raises(ValueError, match="fewer than its digits"):
    error_analysis.charge_lines(["12"], _outputs("12"), np.array([[3, -1]]))


def test_lines_without_ignores_the_padding_past_each_line():
  source_ids = np.array([[1, 2, -1], [3, 4, 5], [6, -1, -1], [7, 8, -1]])
  lengths = np.array([2, 3, 1, 1])  # The last row's 8 is past its end.
  np.testing.assert_array_equal(error_analysis.lines_without(source_ids, lengths, {2, 8}),
                                [False, True, True, True])
  np.testing.assert_array_equal(error_analysis.lines_without(source_ids, lengths, set()),
                                [True] * 4)


def _test_lines(workdir):
  return input_pipeline.line_sources(trained.load_config(workdir), "test")


@pytest.mark.slow
def test_a_readers_analysis_agrees_with_its_evaluation(tiny_workdir):
  result, images = error_analysis.analyze(tiny_workdir, checkpoints=["latest"], top=5)
  evaluation = evaluate.evaluate(tiny_workdir, checkpoints=["latest"], splits=["test"])
  lines = _test_lines(tiny_workdir)
  assert result["lines"] == evaluation["test_num_examples"] == len(lines["digits"]) == 100
  assert result["exact_match"] == pytest.approx(evaluation["test_exact_match"])
  assert result["wrong_lines"] == round(100 * (1 - evaluation["test_exact_match"]))
  # Every misread digit and every digit added is one edit: together they are the CER's edits.
  digits = int(lines["length"].sum())
  assert result["misreadings"] + result["insertions"] == round(evaluation["test_cer"] * digits)
  assert result["digits"] == len(np.unique(lines["source_ids"][lines["source_ids"] >= 0]))
  assert 0 < result["misread_digits"] <= result["digits"]
  assert len(result["most_misread"]) == min(5, result["misread_digits"])
  counts = [d["misread"] for d in result["most_misread"]]
  assert counts == sorted(counts, reverse=True) and all(c <= d["lines"] for c, d in
                                                        zip(counts, result["most_misread"]))
  assert result["exact_match"] <= min(result["exact_match_if_read_right"].values())
  assert max(result["exact_match_if_read_right"].values()) <= (
      result["exact_match_if_all_read_right"])
  assert set(images) >= {d["id"] for d in result["most_misread"]}
  # Each digit added is charged to one or two digits beside it, on its line.
  assert all(0 < d["added"] <= d["lines"] for d in result["added_beside"])
  assert bool(result["added_beside"]) == (result["insertions"] > 0)
  assert set(images) >= {d["id"] for d in result["added_beside"]}
  assert all(images[i].shape == (28, 28) for i in images)
  # Every digit of every line is in one bin of each breakdown, and the misread ones add up.
  for key in ("misread_by_height", "misread_by_overlap"):
    assert sum(r["digits"] for r in result[key]) == digits, key
    assert round(sum(r["digits"] * r["misread"] for r in result[key])) == result["misreadings"]


@pytest.mark.slow
def test_a_classifiers_misread_digits_are_looked_up_on_a_readers_lines(classifier_workdir,
                                                                      tiny_workdir):
  result, images = error_analysis.analyze(classifier_workdir, checkpoints=["latest"],
                                          lines=tiny_workdir)
  report = json.loads((classifier_workdir / "report.json").read_text())
  assert result["digits"] == 1000 and len(images) == 1000
  assert result["accuracy"] == pytest.approx(report["test_accuracy"])
  assert len(result["misread_ids"]) == round(1000 * (1 - report["test_accuracy"])) > 0
  lines = _test_lines(tiny_workdir)
  misread = set(result["misread_ids"])
  kept = [not misread & set(ids[:n].tolist())
          for ids, n in zip(lines["source_ids"], lines["length"])]
  assert result["lines"] == 100
  assert result["lines_without_misread"] == pytest.approx(np.mean(kept))
  for d in result["misread"]:
    assert d["label"] != d["read_as"] and d["id"] in misread
    assert d["lines"] == int((lines["source_ids"] == d["id"]).sum())


@pytest.mark.slow
def test_a_classifier_ensembles_misread_digits_are_those_of_its_mean_probability(
    classifier_workdir, tiny_workdir):
  together, _ = error_analysis.analyze(classifier_workdir, checkpoints=["latest"],
                                       lines=tiny_workdir, ensemble=[f"{classifier_workdir}@50"],
                                       views=3)
  evaluation = evaluate.evaluate(classifier_workdir, checkpoints=["latest"], splits=["test"],
                                 ensemble=[f"{classifier_workdir}@50"], views=3)
  assert together["ensemble"] == evaluation["ensemble"] == [
      {"workdir": str(classifier_workdir), "checkpoint": "50", "step": 50}]
  assert together["accuracy"] == pytest.approx(evaluation["test_accuracy"])
  assert len(together["misread_ids"]) == round(1000 * (1 - evaluation["test_accuracy"]))
  printed = error_analysis.format_result(together, top=3)
  assert f", 3 views, with {classifier_workdir}@50\n" in printed
  assert "these classifiers do together" in printed


@pytest.mark.slow
def test_bad_requests_name_what_to_change(classifier_workdir, tiny_workdir):
  with pytest.raises(ValueError, match="is a reader run"):
    error_analysis.analyze(tiny_workdir, lines=tiny_workdir)
  with pytest.raises(ValueError, match="give --lines=READER_RUN"):
    error_analysis.analyze(classifier_workdir)
  with pytest.raises(ValueError, match="choose among train, validation, test"):
    error_analysis.analyze(tiny_workdir, split="tset")


@pytest.mark.slow
def test_command_line_writes_the_analysis_and_its_digits(tiny_workdir):
  result = subprocess.run(
      [sys.executable, "-m", "digit_vit.error_analysis", f"--workdir={tiny_workdir}",
       "--checkpoint=latest", "--top=4"], capture_output=True, text=True, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  path = tiny_workdir / "errors_test_latest_beam1.json"
  written = json.loads(path.read_text())
  assert written["split"] == "test" and len(written["most_misread"]) == 4
  assert path.with_suffix(".png").stat().st_size > 0
  added = path.with_name(path.stem + "_added.png")
  assert added.exists() == any(d["added"] > 1 for d in written["added_beside"])
  assert "lines, exact match" in result.stdout and f"wrote {path} and " in result.stdout
  bad = subprocess.run(
      [sys.executable, "-m", "digit_vit.error_analysis", f"--workdir={tiny_workdir}",
       f"--lines={tiny_workdir}"], capture_output=True, text=True, cwd=ROOT, check=False)
  assert bad.returncode != 0 and "is a reader run" in bad.stderr
  assert "Traceback" not in bad.stderr
