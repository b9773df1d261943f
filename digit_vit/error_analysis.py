r"""Which source digits a model misreads: errors traced back to the handwritten digits they came
from, and the exact match the lines would reach without them.

Every line of the built dataset records the source id of each of its digits (`sources.py`), and
each test digit appears on about 18 of the 4,000 test lines. So a reader's errors can be
charged to digits: a digit is misread on a line when the reading, aligned to the truth by a
minimum edit-distance alignment, puts another digit in its place or drops it.

  python -m digit_vit.error_analysis --workdir=runs/long --checkpoint=latest [--views=25] \
      [--split=test] [--ensemble=RUN[@CHECKPOINT],...] [--top=30]

prints how concentrated the errors are (the exact match if the most misread digits were read
right), which digits the added digits stand beside (a '0' read as '13' adds one), and where on
the canvas the misread digits were drawn (the share misread by height and by overlap with a
neighbour, from the lines' boxes), and writes
`errors_<split>_<checkpoints>_beam<k>...json` (every misread digit and what it was read as), a
`.png` grid of the most misread digits and a `_added.png` grid of the digits charged with a digit
added on more than one line into the workdir.

A single-digit classifier run (`config.task='classify'` on `mnist_digits`, e.g.
`configs/digit_probe.py`) reads each source digit once; with `--lines=READER_RUN` its misread
digits are looked up on that run's lines:

  python -m digit_vit.error_analysis --workdir=runs/probe --lines=runs/long

gives the fraction of the lines that hold none of them: the exact match of a reader that read
every digit of a line exactly as the classifier reads it alone. With `--ensemble=RUN,...` (further
classifier runs) and `--views=N` (shifted copies of each digit) the misread digits are those of
the mean probability over the classifiers and the views.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags

from digit_vit import cli, evaluate as evaluate_lib, tasks, trained
from digit_vit.models import tokens as tokens_lib

DROPPED = "-"  # What a digit the reading left out was read as.
FIXED_COUNTS = (1, 5, 10, 20, 50)  # Exact match if the k most misread digits were read right.


def align(truth: str, reading: str) -> tuple[list[str], int]:
  """What a reading put in the place of each true digit, by a minimum edit-distance alignment.

  Ties prefer a substitution, then a deletion: '123' read as '13' drops the 2, not the 3.

  Returns:
    (read_as, insertions): read_as[i] is the digit aligned to truth[i] (== truth[i] when read
    right) or DROPPED; insertions counts digits read that stand for no true digit.
  """
  read_as, gaps = alignment(truth, reading)
  return read_as, len(gaps)


def alignment(truth: str, reading: str) -> tuple[list[str], list[int]]:
  """`align`'s read_as, and for each digit added the gap of the truth it was added in: k means
  between truth[k - 1] and truth[k] (0: before the first digit, len(truth): after the last)."""
  m, n = len(truth), len(reading)
  cost = np.zeros((m + 1, n + 1), np.int32)
  cost[:, 0] = np.arange(m + 1)
  cost[0, :] = np.arange(n + 1)
  for i in range(1, m + 1):
    for j in range(1, n + 1):
      cost[i, j] = min(cost[i - 1, j - 1] + (truth[i - 1] != reading[j - 1]),
                       cost[i - 1, j] + 1, cost[i, j - 1] + 1)
  read_as, gaps = [DROPPED] * m, []
  i, j = m, n
  while i > 0 or j > 0:
    if i > 0 and j > 0 and cost[i, j] == cost[i - 1, j - 1] + (truth[i - 1] != reading[j - 1]):
      read_as[i - 1] = reading[j - 1]
      i, j = i - 1, j - 1
    elif i > 0 and cost[i, j] == cost[i - 1, j] + 1:
      i -= 1
    else:
      gaps.append(i)
      j -= 1
  return read_as, gaps[::-1]


def beside_added(truth: str, read_as: Sequence[str], gaps: Sequence[int]) -> list[set[int]]:
  """The positions in the truth each added digit is charged to: its neighbours either side of
  the gap it was added in, or only those of them misread when there are (a digit misread as
  two, '0' read '13', is charged the digit added). Which neighbour an added digit came from
  is not known from the reading alone, hence both when neither is misread."""
  charged = []
  for g in gaps:
    near = [k for k in (g - 1, g) if 0 <= k < len(truth)]
    misread = [k for k in near if read_as[k] != truth[k]]
    charged.append(set(misread or near))
  return charged


@dataclasses.dataclass
class LineErrors:
  """A split's readings charged to the source digits of its lines.

  Attributes:
    right: bool [n], the line was read exactly (its digits, then `<eos>`; as `metrics`).
    blamed: per line, the source ids of its digits that were misread (substituted or dropped).
    unexplained: bool [n], a wrong line that misreading its digits does not explain alone:
      a digit added, or no `<eos>` (or another token before it).
    insertions: int [n], digits read that stand for no true digit.
    added_beside: source id -> the number of lines on which a digit added was charged to it
      (`beside_added`).
    occurrences: source id -> the number of lines it is on.
    misread: source id -> what it was read as on the lines it was misread on (DROPPED: left out).
    labels: source id -> its digit.
    misread_at: bool [n, max_digits], the line's k-th digit was misread (False past its end).
  """
  right: np.ndarray
  blamed: list[frozenset[int]]
  unexplained: np.ndarray
  insertions: np.ndarray
  added_beside: collections.Counter
  occurrences: collections.Counter
  misread: dict[int, collections.Counter]
  labels: dict[int, int]
  misread_at: np.ndarray

  def ranked(self) -> list[int]:
    """The source ids misread at least once, most misread first (ties: more often misread
    relative to lines, then the lower id)."""
    return sorted(self.misread, key=lambda i: (-sum(self.misread[i].values()),
                                               -sum(self.misread[i].values())
                                               / self.occurrences[i], i))

  def exact_match_if_read_right(self, ids) -> float:
    """Exact match if the digits `ids` were read right wherever they appear (nothing else
    changing): the right lines, and the wrong ones whose only errors are those digits."""
    ids = frozenset(ids)
    fixed = [not u and b <= ids for b, u in zip(self.blamed, self.unexplained)]
    return float(np.mean(self.right | np.array(fixed, bool)))


def charge_lines(truths: Sequence[str], outputs: np.ndarray,
                 source_ids: np.ndarray) -> LineErrors:
  """Charges each wrong reading to the source digits it misread.

  Args:
    truths: the true digits of each line, [n].
    outputs: the model's raw outputs int [n, max_digits + 1] (`tokens.read_output`).
    source_ids: int [n, max_digits], each digit's source id (-1 past the line's end).
  """
  if len(truths) != len(outputs) or len(truths) != len(source_ids):
    raise ValueError(f"{len(truths)} truths, {len(outputs)} outputs and {len(source_ids)} "
                     "source-id rows: one each per line")
  right, blamed, unexplained, added = [], [], [], []
  occurrences, added_beside, misread, labels = collections.Counter(), collections.Counter(), {}, {}
  misread_at = np.zeros(np.shape(source_ids), bool)
  for line, (truth, output, ids) in enumerate(zip(truths, outputs, np.asarray(source_ids))):
    reading = tokens_lib.read_output(output)
    ids = [int(i) for i in ids[:len(truth)]]
    if min(ids, default=0) < 0:
      raise ValueError(f"line {truth!r} has source ids {ids}: fewer than its digits")
    occurrences.update(ids)
    labels.update({i: int(d) for i, d in zip(ids, truth)})
    read_as, gaps = alignment(truth, reading.digits)
    insertions = len(gaps)
    added_beside.update({ids[k] for charged in beside_added(truth, read_as, gaps)
                         for k in charged})
    wrong = frozenset(i for i, d, r in zip(ids, truth, read_as) if r != d)
    for k, (i, d, r) in enumerate(zip(ids, truth, read_as)):
      if r != d:
        misread.setdefault(i, collections.Counter())[r] += 1
        misread_at[line, k] = True
    right.append(reading.well_formed and not wrong and not insertions)
    blamed.append(wrong)
    unexplained.append(bool(insertions) or not reading.well_formed)
    added.append(insertions)
  return LineErrors(np.array(right, bool), blamed, np.array(unexplained, bool),
                    np.array(added, np.int64), added_beside, occurrences, misread, labels,
                    misread_at)


# Bins of the digits' geometry on the canvas: height as a share of the canvas height, and the
# overlap in pixels with the nearer neighbour (boxes apart: negative).
HEIGHT_BINS = (0.0, 0.6, 0.7, 0.8, 0.9, np.inf)
OVERLAP_BINS = (-np.inf, -4.0, -2.0, 0.0, 2.0, 4.0, np.inf)


def digit_geometry(bboxes: np.ndarray, lengths: np.ndarray, *,
                   width: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each digit's height (share of the canvas) and overlap with its neighbours (pixels).

  Args:
    bboxes: float [n, max_digits, 4], (ymin, xmin, ymax, xmax) normalised to [0, 1].
    lengths: int [n]; width: each line's width in pixels, int [n, 1] (or one for all lines).

  Returns:
    (height, overlap): float [n, max_digits] each; overlap is how far the digit's box runs into
    its left or right neighbour's, the larger of the two (negative: the gap to the nearer one;
    -inf for a digit alone on its line). Both NaN past each line's end.
  """
  bboxes, lengths = np.asarray(bboxes, np.float64), np.asarray(lengths)
  n, max_digits = bboxes.shape[:2]
  on_line = np.arange(max_digits)[None, :] < lengths[:, None]
  height = np.where(on_line, bboxes[..., 2] - bboxes[..., 0], np.nan)
  xmin, xmax = bboxes[..., 1] * width, bboxes[..., 3] * width
  # How far each digit's box runs into the next one's: the overlap of that pair.
  pairs = np.where(on_line[:, 1:], xmax[:, :-1] - xmin[:, 1:], -np.inf)
  with_next, with_previous = np.full((2, n, max_digits), -np.inf)
  with_next[:, :-1], with_previous[:, 1:] = pairs, pairs
  overlap = np.where(on_line, np.maximum(with_next, with_previous), np.nan)
  return height, overlap


def misread_by(values: np.ndarray, misread_at: np.ndarray, edges: Sequence[float]) -> list[dict]:
  """The digits and the share misread in each bin [edges[i], edges[i + 1]) of `values`
  (float [n, max_digits], NaN past each line's end); empty bins are left out. An infinite edge
  is written None (JSON has no infinity)."""
  rows = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    in_bin = (values >= lo) & (values < hi)
    if in_bin.any():
      rows.append({"from": None if np.isinf(lo) else float(lo),
                   "to": None if np.isinf(hi) else float(hi),
                   "digits": int(in_bin.sum()), "misread": float(misread_at[in_bin].mean())})
  return rows


def lines_without(source_ids: np.ndarray, lengths: np.ndarray, ids) -> np.ndarray:
  """bool [n]: which lines hold none of the source digits `ids`.

  Args:
    source_ids: int [n, max_digits] (-1 past each line's end); lengths: int [n].
  """
  source_ids, lengths = np.asarray(source_ids), np.asarray(lengths)
  on_line = np.arange(source_ids.shape[1])[None, :] < lengths[:, None]
  hit = np.isin(source_ids, np.asarray(sorted(ids), np.int64)) & on_line
  return ~hit.any(axis=1)


def summarize_lines(errors: LineErrors, *, top: int, bboxes: np.ndarray | None = None,
                    lengths: np.ndarray | None = None,
                    width: int | np.ndarray = 0) -> dict[str, Any]:
  """The JSON-ready analysis of a reader's lines; given the lines' `bboxes` and `lengths` (and
  the lines' `width`, see `digit_geometry`), also the share of digits misread by height and by overlap."""
  ranked = errors.ranked()
  n = len(errors.right)
  geometry = {}
  if bboxes is not None:
    height, overlap = digit_geometry(bboxes, lengths, width=width)
    geometry = {"misread_by_height": misread_by(height, errors.misread_at, HEIGHT_BINS),
                "misread_by_overlap": misread_by(overlap, errors.misread_at, OVERLAP_BINS)}
  return {**geometry,
      "lines": n,
      "exact_match": float(np.mean(errors.right)),
      "wrong_lines": int(n - errors.right.sum()),
      "unexplained_lines": int(errors.unexplained.sum()),
      "digits": len(errors.occurrences),
      "misread_digits": len(ranked),
      "misreadings": int(sum(sum(c.values()) for c in errors.misread.values())),
      "insertions": int(errors.insertions.sum()),
      "added_beside": [{"id": i, "label": errors.labels[i], "lines": errors.occurrences[i],
                        "added": n} for i, n in sorted(errors.added_beside.items(),
                                                       key=lambda kv: (-kv[1], kv[0]))[:top]],
      "exact_match_if_read_right": {
          str(k): errors.exact_match_if_read_right(ranked[:k]) for k in FIXED_COUNTS
          if k <= len(ranked)},
      "exact_match_if_all_read_right": errors.exact_match_if_read_right(ranked),
      "most_misread": [_digit_record(errors, i) for i in ranked[:top]],
      "every_misread": {str(i): dict(errors.misread[i]) for i in ranked},
  }


def added_repeatedly(summary: dict[str, Any]) -> list[dict[str, Any]]:
  """The records of `summary['added_beside']` charged on more than one line: a digit added once
  beside a digit says little about that digit."""
  return [d for d in summary.get("added_beside", []) if d["added"] > 1]


def _digit_record(errors: LineErrors, i: int) -> dict[str, Any]:
  return {"id": i, "label": errors.labels[i], "lines": errors.occurrences[i],
          "misread": sum(errors.misread[i].values()), "read_as": dict(errors.misread[i])}


def format_lines(summary: dict[str, Any], *, top: int) -> str:
  s = summary
  out = [f"{s['lines']} lines, exact match {s['exact_match']:.2%}: {s['wrong_lines']} wrong, "
         f"{s['unexplained_lines']} of them with a digit added or no <eos>",
         f"{s['misread_digits']} of the {s['digits']} source digits misread at least once, "
         f"{s['misreadings']} misreadings in all, and {s['insertions']} digits added",
         "exact match if the k most misread digits were read right: " + ", ".join(
             f"k={k}: {v:.2%}" for k, v in s["exact_match_if_read_right"].items())
         + f", all: {s['exact_match_if_all_read_right']:.2%}",
         "most misread: id  label  misread/lines  read as"]
  if s["added_beside"]:
    repeated = added_repeatedly(s)
    once = len(s["added_beside"]) - len(repeated)
    out.insert(-1, "digits added, charged to the misread neighbour (else both neighbours): "
               + ", ".join([f"{d['id']} ({d['label']}) on {d['added']} of {d['lines']} lines"
                            for d in repeated] + [f"{once} more on one line each"] * bool(once)))
  geometry = []
  for key, what, unit in (("misread_by_height", "height (share of the canvas)", ""),
                          ("misread_by_overlap", "overlap with a neighbour", " px")):
    if key in s:
      geometry.append(f"digits misread by {what}: " + ", ".join(
          f"{_bin(r['from'], r['to'], unit)} {r['misread']:.2%} of {r['digits']}"
          for r in s[key]))
  out[-1:-1] = geometry
  for d in s["most_misread"][:top]:
    read_as = " ".join(f"{k}x{v}" for k, v in sorted(d["read_as"].items(), key=lambda kv: -kv[1]))
    out.append(f"  {d['id']:>6}  {d['label']}  {d['misread']:>3}/{d['lines']:<3}  {read_as}")
  return "\n".join(out)


def _bin(lo: float | None, hi: float | None, unit: str) -> str:
  if lo is None:
    return f"<{hi:g}{unit}"
  if hi is None:
    return f">={lo:g}{unit}"
  return f"[{lo:g}, {hi:g}){unit}"


def plot_digits(images: dict[int, np.ndarray], titles: dict[int, str], path, *,
                columns: int = 10):
  """A grid of source digits (ink dark on white), each under its title."""
  from digit_vit import reporting  # pylint: disable=import-outside-toplevel  (matplotlib)
  plt = reporting.plt
  rows = max(1, -(-len(titles) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, (i, title) in zip(axes.ravel(), titles.items()):
    ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=255)
    ax.set_title(title, fontsize=7, color="red")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def digit_titles(result: dict[str, Any], top: int) -> dict[int, str]:
  """Source id -> 'id: label->most common misreading' and how often, for the digits drawn."""
  if tasks.by_name(result["task"]).reads_lines:
    return {d["id"]: f"{d['id']}: {d['label']}->{max(d['read_as'], key=d['read_as'].get)}\n"
                     f"{d['misread']}/{d['lines']} lines" for d in result["most_misread"][:top]}
  return {d["id"]: f"{d['id']}: {d['label']}->{d['read_as']}\non {d['lines']} lines"
          for d in result["misread"][:top]}


def source_digits(config, split: str):
  """The `sources.DigitSet` of `split` of the run's digit source."""
  from digit_vit.data import sources  # pylint: disable=import-outside-toplevel
  d = config.data
  return sources.load_digits(d.get("source", "embedded"), split,
                             validation_per_class=int(d.get("validation_per_class", 40)),
                             source_dir=d.get("source_dir", ""))


def analyze(workdir: str | os.PathLike, *, checkpoints: Sequence[trained.Checkpoint] = ("best",),
            split: str = "test", beam_size: int | None = None, alpha: float | None = None,
            views: int | None = None, ema: bool = True,
            ensemble: Sequence[str | os.PathLike] = (), lines: str | os.PathLike | None = None,
            top: int = 30) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
  """The error analysis of a run's checkpoint(s) on `split`.

  Args:
    workdir: a reader run, or a single-digit classifier run with `lines`.
    checkpoints, beam_size, alpha, views, ema, ensemble: as in `evaluate.evaluate`.
    lines: for a classifier run: the reader run whose lines of `split` its misread digits are
      looked up on. Must be None for a reader run.
    top: how many of the most misread digits to list.

  Returns:
    (result, images): the JSON-ready result, and the source images of its digits by id.
  """
  # Imported here: the input pipeline brings TensorFlow.
  from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
  config = trained.load_config(workdir)
  task = tasks.get(config)
  if task.reads_lines and lines is not None:
    raise ValueError(f"{workdir} is a reader run: it reads its own lines; --lines is for a "
                     "single-digit classifier run")
  if not task.reads_lines and (lines is None or config.data.get("name") != "mnist_digits"):
    raise ValueError(f"{workdir} is a classifier run: give --lines=READER_RUN, whose lines its "
                     "misread digits are looked up on (and it must classify MNIST digits, "
                     f"config.data.name='mnist_digits', not {config.data.get('name')!r})")
  if split not in input_pipeline.SPLITS:
    raise ValueError(f"--split={split}: choose among {', '.join(input_pipeline.SPLITS)}")
  if jax.process_count() > 1:
    raise ValueError("error_analysis reads a whole split in one process; run it on one host")
  beam_size, alpha, views = trained.decoding(config, beam_size, alpha, views)
  line_config = config if lines is None else trained.load_config(lines, task="read")
  if line_config.data.get("source", "embedded") != config.data.get("source", "embedded"):
    raise ValueError(f"{workdir} classifies digits of the {config.data.source!r} source but "
                     f"the lines of {lines} are made of {line_config.data.source!r} digits")
  evaluator, params, reading = evaluate_lib.reading_evaluator(
      workdir, config, checkpoints=checkpoints, beam_size=beam_size, alpha=alpha, views=views,
      ema=ema, ensemble=ensemble)
  predictions = evaluator.predictions(params, split)
  line_info = input_pipeline.line_sources(line_config, split)
  digits = source_digits(config, split)
  images = {int(i): image for i, image in zip(digits.ids, digits.images)}
  result: dict[str, Any] = {"workdir": str(workdir), "split": split, "task": task.name,
                            **reading}
  if task.reads_lines:
    errors = charge_lines(line_info["digits"], predictions, line_info["source_ids"])
    result.update(summarize_lines(errors, top=top, bboxes=line_info["bboxes"],
                                  lengths=line_info["length"],
                                  width=line_info["width"][:, None]))
    return result, images

  ids, labels = digits.ids, digits.labels  # The classifier reads its split in this order.
  if len(predictions) != len(ids):
    raise ValueError(f"{workdir} read {len(predictions)} digits of {split}; the source has "
                     f"{len(ids)}")
  wrong = ids[predictions != labels]
  on_lines = np.unique(line_info["source_ids"][line_info["source_ids"] >= 0])
  if not np.isin(on_lines, ids).all():
    raise ValueError(f"the {split} lines of {lines} hold digits that {workdir} did not read "
                     "(a different config.data.validation_per_class or source_dir?)")
  kept = lines_without(line_info["source_ids"], line_info["length"], wrong)
  result.update({
      "lines_workdir": str(lines), "digits": len(ids),
      "accuracy": float(np.mean(predictions == labels)),
      "misread_ids": [int(i) for i in wrong],
      "misread": [{"id": int(i), "label": int(labels[k]), "read_as": int(predictions[k]),
                   "lines": int((line_info["source_ids"] == i).sum())}
                  for k, i in enumerate(ids) if predictions[k] != labels[k]],
      "lines": int(len(kept)),
      "lines_without_misread": float(np.mean(kept)),
  })
  return result, images


def format_result(result: dict[str, Any], *, top: int) -> str:
  head = f"{result['workdir']} {result['split']}, steps {result['steps']}"
  with_members = "".join(f", with {m['workdir']}@{m['checkpoint']}" for m in result["ensemble"])
  if tasks.by_name(result["task"]).reads_lines:
    head += f", beam {result['beam_size']}, {result['views']} view(s)" + with_members
    return head + "\n" + format_lines(result, top=top)
  reader = "these classifiers do together" if result["ensemble"] else "this classifier does"
  views = f", {result['views']} views" if result["views"] > 1 else ""
  return "\n".join([
      head + views + with_members,
      f"{result['digits']} digits, accuracy {result['accuracy']:.2%}; misread: "
      + ", ".join(f"{d['id']} ({d['label']}->{d['read_as']}, on {d['lines']} lines)"
                  for d in result["misread"]),
      f"lines of {result['lines_workdir']}'s {result['split']} split that hold none of them: "
      f"{result['lines_without_misread']:.2%} of {result['lines']} (the exact match of a "
      f"reader that read every digit as {reader})"])


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global."""
  cli.define_reader_flags(flag_values, model=False, several_checkpoints=True, ema=True)
  flags.DEFINE_string("split", "test", "The split to analyse.", flag_values=flag_values)
  flags.DEFINE_string("lines", None, "For a classifier run: the reader run whose lines its "
                      "misread digits are looked up on.", flag_values=flag_values)
  flags.DEFINE_integer("top", 30, "How many of the most misread digits to list and draw.",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_string("output", None, "JSON file (default: workdir/errors_<split>_<checkpoints>"
                      "_beam<k>....json; the grid of digits goes beside it as .png).",
                      flag_values=flag_values)


def main(argv):
  checkpoints = evaluate_lib.start_reading_command(argv)
  try:
    result, images = analyze(FLAGS.workdir, checkpoints=checkpoints, split=FLAGS.split,
                             beam_size=FLAGS.beam_size, alpha=FLAGS.alpha, views=FLAGS.views,
                             ema=FLAGS.ema, ensemble=FLAGS.ensemble, lines=FLAGS.lines,
                             top=FLAGS.top)
  except (ValueError, FileNotFoundError) as e:
    cli.usage_error(str(e))
  path = pathlib.Path(FLAGS.output or evaluate_lib.output_path(
      FLAGS.workdir, checkpoints, result["beam_size"], FLAGS.ema, result["views"],
      1 + len(FLAGS.ensemble), prefix=f"errors_{FLAGS.split}"))
  path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
  written = [path]
  titles = digit_titles(result, FLAGS.top)
  if titles:
    written.append(path.with_suffix(".png"))
    plot_digits(images, titles, written[-1])
  repeated = added_repeatedly(result)
  if repeated:
    written.append(path.with_name(path.stem + "_added.png"))
    plot_digits(images, {d["id"]: f"{d['id']}: {d['label']}, digit added\non {d['added']}/"
                                  f"{d['lines']} lines" for d in repeated}, written[-1])
  print(format_result(result, top=FLAGS.top))
  print("wrote " + " and ".join(str(w) for w in written))
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
