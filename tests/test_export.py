"""Exporting a reader (digit_vit/export.py) and reading with it (digit_vit/serving.py).

One export of the session's tiny run (conftest.py) serves every test: it reads exactly what the
in-process `predict.Reader` reads, its loader imports nothing heavy, its manifest is checked,
and `predict --model` and `demo --model` read with it.
"""

import base64
import csv
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from digit_vit import calibration, cli, demo, export, predict, preprocess, serving
from digit_vit.data import sources, wild
from digit_vit.models import tokens

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
HEAVY = ("flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "ml_collections", "absl",
         "clu", "chex")


@pytest.fixture(scope="module")
def exported(tiny_export):
  """The tiny run's latest checkpoint (the step its report.json measured), exported: the
  session's export (conftest.py), shared with test_release.py."""
  return tiny_export


@pytest.fixture(scope="module")
def in_process(tiny_workdir):
  return predict.Reader(tiny_workdir, checkpoint="latest", batch_size=8)


@pytest.fixture(scope="module")
def lines(tiny_workdir):
  """Test-split lines of the tiny run (1-3 digits, both buckets), a few wild and long lines
  (wider than the widest bucket: fitted into it), one inverted, and a blank image."""
  from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
  config = predict.load_config(tiny_workdir)
  batch = next(input_pipeline.eval_iterator(config, "test", batch_size=20))
  images = list(np.uint8(np.round(batch["image"][..., 0] * 255)))
  digits = sources.load_digits("embedded", "test", validation_per_class=40)
  images += [image for image, _, _ in wild.generate("wild", digits, 4, seed=0)]
  images += [image for image, _, _ in wild.generate("long", digits, 2, seed=0)]
  images += [255 - images[0], np.full((30, 60), 255, np.uint8)]
  return images


def _copy(exported, tmp_path) -> pathlib.Path:
  target = tmp_path / "copy"
  shutil.copytree(exported[0], target)
  return target


def _edit_manifest(directory, edit):
  path = directory / serving.MANIFEST
  manifest = json.loads(path.read_text())
  edit(manifest)
  path.write_text(json.dumps(manifest))


def _rehash(directory, kind, width):
  """Records a file's new checksum, so that loading gets past the checksum to the file itself."""
  def edit(manifest):
    entry = (manifest["parameters"] if kind == "parameters"
             else manifest["functions"][kind][str(width)])
    entry["sha256"] = serving.sha256(directory / entry["file"])
  _edit_manifest(directory, edit)


# ---- The round trip


def test_the_export_reads_exactly_what_the_in_process_reader_reads(exported, in_process, lines):
  reader = serving.load(exported[0])
  expected, got = in_process.read(lines), reader.read(lines)
  assert len(got) == len(lines)
  buckets_used = {p.canvas.shape[1] <= 24 for p in expected if not p.no_ink}
  assert buckets_used == {True, False}  # Both width buckets are exercised.
  for want, have in zip(expected, got):
    assert have.tokens == want.tokens
    assert have.digits == want.digits and have.truncated == want.truncated
    assert have.no_ink == want.no_ink
    assert have.confidence == pytest.approx(want.confidence, rel=1e-5, abs=1e-7)
    assert have.log_prob == pytest.approx(want.log_prob, rel=1e-5, abs=1e-6)
    np.testing.assert_array_equal(have.canvas, want.canvas)  # The same preprocessing code.
    # The per-token probabilities multiply to the confidence; 1 after <eos>.
    assert len(have.token_probs) == reader.max_length == 17
    assert np.prod(have.token_probs) == pytest.approx(have.confidence, rel=1e-4)
    if not have.truncated:
      assert have.token_probs[len(have.digits) + 1:] == pytest.approx(
          [1.0] * (17 - len(have.digits) - 1))
  assert got[-1].no_ink and got[-1].tokens == [tokens.EOS] + [tokens.PAD] * 16
  assert got[-1].confidence == 1.0 and not got[-1].rejected
  # One program per bucket (each bucket's lines in one call padded to a power of two rows),
  # never one per image.
  assert reader.compilations == 2


def test_beam_search_and_views_export_as_they_read(tiny_workdir, lines, tmp_path):
  """Decoding settings given at export are built in: beam search over test-time views, with a
  symbolic batch, reads what the in-process Reader reads with the same settings."""
  manifest = export.export_reader(tiny_workdir, tmp_path / "beam", checkpoint="latest",
                                  beam_size=3, views=2)
  assert (manifest["decode"]["beam_size"], manifest["decode"]["views"]) == (3, 2)
  reader = serving.load(tmp_path / "beam")
  some = lines[:5] + lines[20:22]
  want = predict.Reader(tiny_workdir, checkpoint="latest", beam_size=3, views=2,
                        batch_size=8).read(some)
  for w, h in zip(want, reader.read(some)):
    assert h.tokens == w.tokens
    assert h.confidence == pytest.approx(w.confidence, rel=1e-5, abs=1e-7)


def test_attention_maps_match_the_in_process_reader(exported, in_process, lines):
  reader = serving.load(exported[0])
  some = lines[:2] + lines[20:21]
  for want, have in zip(in_process.read(some, attention=True), reader.read(some, attention=True)):
    assert have.attention.shape == want.attention.shape
    np.testing.assert_allclose(have.attention, want.attention, atol=1e-5)
  # The demo's picture of them works on an exported reading too.
  assert predict.attention_overlay(have).size[0] > 0


def test_a_batch_larger_than_batch_size_is_read_in_calls_of_batch_size(exported, lines):
  small = serving.load(exported[0], batch_size=3)
  big = serving.load(exported[0])
  assert [r.tokens for r in small.read(lines)] == [r.tokens for r in big.read(lines)]


def test_min_confidence_marks_rejected_readings(exported, lines):
  reader = serving.load(exported[0], min_confidence=0.5)
  readings = reader.read(lines[:8])
  assert [r.rejected for r in readings] == [r.confidence < 0.5 for r in readings]
  assert all(r.rejected for r in reader.read(lines[:8], min_confidence=1.0))
  assert not any(r.rejected for r in reader.read(lines[:8], min_confidence=0.0))
  with pytest.raises(ValueError, match=r"min_confidence must be in \[0, 1\], got 1.5"):
    serving.load(exported[0], min_confidence=1.5)


# ---- The manifest


def test_the_manifest_records_the_run(exported, tiny_workdir):
  directory, manifest = exported
  assert json.loads((directory / "manifest.json").read_text()) == manifest
  assert manifest["format"] == "digit_vit.reader" and manifest["format_version"] == 1
  assert manifest["vocabulary"]["tokens"] == list(tokens.TOKEN_NAMES)
  assert (manifest["vocabulary"]["eos"], manifest["vocabulary"]["pad"]) == (11, 12)
  assert manifest["image"] == {**manifest["image"], "height": 16, "channels": 1,
                               "buckets": [24, 48]}
  assert manifest["decode"] == {"reader": "decoder", "beam_size": 1, "alpha": 0.6, "views": 1,
                                "max_length": 17, "max_digits": 16}
  # The temperature the run fitted on its validation split (the in-process Reader's too).
  assert manifest["calibration"]["temperature"] == calibration.load_temperature(tiny_workdir)
  fit = tiny_workdir / "calibration.json"
  if fit.is_file():
    assert manifest["calibration"]["fit"] == json.loads(fit.read_text())
    assert manifest["calibration"]["temperature"] == manifest["calibration"]["fit"]["temperature"]
  assert serving.load(directory).temperature == manifest["calibration"]["temperature"]
  config = json.loads((tiny_workdir / "config.json").read_text())
  run = manifest["run"]
  assert run["config"] == config and run["step"] == 30 and run["checkpoint"] == "latest"
  report = json.loads((tiny_workdir / "report.json").read_text())
  assert run["commit"] == report["environment"]["code"]
  # report.json measured step 30, the exported one: its test metrics are the manifest's.
  assert run["metrics_source"]["file"] == "report.json"
  assert run["metrics"]["test_exact_match"] == report["test_exact_match"]
  assert run["metrics"]["test_cer"] == report["test_cer"]
  assert not any(k.startswith("validation_") for k in run["metrics"])
  files = sorted(p.name for p in directory.iterdir())
  assert files == ["attention_w24.jaxexport", "attention_w48.jaxexport", "manifest.json",
                   "params.npz", "read_w24.jaxexport", "read_w48.jaxexport"]
  with np.load(directory / "params.npz") as params:
    assert sorted(params.files) == sorted(manifest["parameters"]["names"])
    assert sum(params[n].size for n in params.files) == manifest["parameters"]["count"]
  assert "decoder/logits/bias" in manifest["parameters"]["names"]


def test_metrics_come_from_an_evaluation_of_the_exported_step(tmp_path):
  """An `evaluate` JSON of the step, decoding as exported, wins over another decoding, other
  steps, an ensemble and report.json."""
  reading = export.trained.Decoding(beam_size=4, alpha=0.6, views=1)
  files = {
      "evaluation_best_beam1.json": {"steps": [200], "beam_size": 1, "views": 1,
                                     "test_exact_match": 0.90, "wild_exact_match": 0.5},
      "evaluation_best_beam4.json": {"steps": [200], "beam_size": 4, "views": 1,
                                     "test_exact_match": 0.92, "long_cer": 0.1,
                                     "validation_exact_match": 0.93},
      "evaluation_100_beam4.json": {"steps": [100], "beam_size": 4, "views": 1,
                                    "test_exact_match": 0.5},
      "evaluation_best_beam4_ensemble2.json": {"steps": [200], "beam_size": 4, "views": 1,
                                               "ensemble": [{"workdir": "x"}],
                                               "test_exact_match": 0.99},
      "report.json": {"steps": 200, "test_exact_match": 0.8},
  }
  for name, record in files.items():
    (tmp_path / name).write_text(json.dumps(record))
  metrics, source = export.measured_metrics(tmp_path, 200, reading)
  assert metrics == {"test_exact_match": 0.92, "long_cer": 0.1}
  assert source == {"file": "evaluation_best_beam4.json", "step": 200, "beam_size": 4,
                    "views": 1}
  assert export.measured_metrics(tmp_path, 300, reading) == ({}, None)


def test_the_temperature_is_the_one_fitted_for_the_exported_decoding(tmp_path):
  """calibration.json fitted for the run's 25 views; an export reading one view takes the
  temperature an `evaluate` of that step fitted for one view, and falls back to the run's."""
  def fit(step, views, temperature, beam_size=1):
    return {"step": step, "temperature": temperature, "validation_ece": 0.1,
            "decode": {"beam_size": beam_size, "alpha": 0.6, "views": views}}
  (tmp_path / "config.json").write_text(json.dumps({"ema_decay": 0.999}))
  (tmp_path / "calibration.json").write_text(json.dumps(fit(500, 25, 1.1)))
  files = {
      "evaluation_best_beam1.json": {"steps": [500], "ema": True, "calibration": fit(500, 1, 1.3)},
      # Other parameters or readings: the raw parameters, another step, an ensemble, a beam.
      "evaluation_best_beam1_noema.json": {"steps": [500], "ema": False,
                                           "calibration": fit(500, 1, 9.0)},
      "evaluation_400_beam1.json": {"steps": [400], "ema": True, "calibration": fit(400, 1, 8.0)},
      "evaluation_best_beam1_ensemble2.json": {"steps": [500], "ema": True, "ensemble": [{}],
                                               "calibration": fit(500, 1, 7.0)},
      "evaluation_best_beam4.json": {"steps": [500], "ema": True,
                                     "calibration": fit(500, 1, 6.0, beam_size=4)},
  }
  for name, record in files.items():
    (tmp_path / name).write_text(json.dumps(record))
  one_view = export.trained.Decoding(beam_size=1, alpha=0.6, views=1)
  chosen = export.calibration_of(tmp_path, 500, one_view)
  assert chosen == {"temperature": 1.3,
                    "fit": {**fit(500, 1, 1.3), "file": "evaluation_best_beam1.json"}}
  run = {"temperature": 1.1, "fit": fit(500, 25, 1.1)}
  assert export.calibration_of(tmp_path, 500, one_view._replace(views=25)) == run
  assert export.calibration_of(tmp_path, 600, one_view) == run   # nothing fitted for step 600
  assert export.calibration_of(tmp_path, 500, one_view._replace(views=5)) == run
  assert export.calibration_of(tmp_path) == run


def test_another_format_version_names_both_versions(exported, tmp_path):
  directory = _copy(exported, tmp_path)
  _edit_manifest(directory, lambda m: m.update(format_version=7))
  with pytest.raises(serving.ArtifactError, match="format version 7.*format version 1"):
    serving.load(directory)


def test_missing_fields_are_named(exported, tmp_path):
  directory = _copy(exported, tmp_path)

  def edit(manifest):
    del manifest["calibration"]
    del manifest["image"]["buckets"]
  _edit_manifest(directory, edit)
  with pytest.raises(serving.ArtifactError,
                     match=r"lacks the field\(s\) image\.buckets, calibration\.temperature"):
    serving.load(directory)


def test_not_an_export_is_refused(tmp_path):
  with pytest.raises(serving.ArtifactError, match="no such directory"):
    serving.load(tmp_path / "missing")
  with pytest.raises(serving.ArtifactError, match="has no manifest.json"):
    serving.load(tmp_path)
  (tmp_path / "manifest.json").write_text("{not json")
  with pytest.raises(serving.ArtifactError, match="cannot be read as JSON"):
    serving.load(tmp_path)
  (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
  with pytest.raises(serving.ArtifactError, match="not a digit_vit reader manifest"):
    serving.load(tmp_path)


@pytest.mark.parametrize("kind", ["read", "parameters"])
def test_a_truncated_file_is_found_by_its_checksum(exported, tmp_path, kind):
  directory = _copy(exported, tmp_path)
  path = directory / ("read_w48.jaxexport" if kind == "read" else "params.npz")
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(serving.ArtifactError, match=f"{path.name} .*is damaged"):
    serving.load(directory)
  path.unlink()
  with pytest.raises(serving.ArtifactError, match=f"{path.name} .*is missing"):
    serving.load(directory)


def test_a_corrupted_file_with_a_matching_checksum_is_a_clear_error(exported, tmp_path):
  """Past the checksum (the manifest edited to match): jax's deserializer and numpy's loader
  fail, and the loader says which file, never a crash deep in XLA."""
  directory = _copy(exported, tmp_path)
  path = directory / "read_w24.jaxexport"
  data = bytearray(path.read_bytes())
  path.write_bytes(bytes(data[:len(data) // 2]))
  _rehash(directory, "read", 24)
  with pytest.raises(serving.ArtifactError, match="read_w24.jaxexport .*cannot be deserialized"):
    serving.load(directory)
  shutil.copy(exported[0] / "read_w24.jaxexport", path)
  _rehash(directory, "read", 24)
  params = directory / "params.npz"
  params.write_bytes(params.read_bytes()[:2000])
  _rehash(directory, "parameters", None)
  with pytest.raises(serving.ArtifactError, match="params.npz cannot be read"):
    serving.load(directory)


# ---- The lean loader


def test_the_loader_imports_nothing_heavy(exported):
  """In a fresh process: load and read with jax, numpy and Pillow only."""
  script = (
      "import sys\n"
      "import numpy as np\n"
      "from digit_vit import serving\n"
      f"reader = serving.load({str(exported[0])!r})\n"
      "image = np.zeros((28, 60), np.uint8); image[4:24, 10:14] = 255\n"
      "reading = reader.read([image])[0]\n"
      "assert len(reading.tokens) == 17 and 0 < reading.confidence <= 1\n"
      f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"


def test_numpy_morphology_equals_scipys():
  """preprocess's erosion and dilation (numpy, so the loader needs no SciPy of its own) are
  SciPy's, bit for bit, for odd and even windows, windows larger than the image, and edges."""
  rng = np.random.default_rng(0)
  for _ in range(300):
    h, w = (int(n) for n in rng.integers(1, 14, 2))
    x = rng.random((h, w)).astype(np.float32)
    x[rng.random((h, w)) < 0.5] = 0
    size = tuple(int(s) for s in rng.integers(1, 2 * max(h, w) + 2, 2))
    np.testing.assert_array_equal(preprocess.grey_dilation(x, size),
                                  ndimage.grey_dilation(x, size=size))
    mask = x > 0.3
    np.testing.assert_array_equal(preprocess.binary_erosion(mask), ndimage.binary_erosion(mask))


def test_predict_prepares_images_with_the_shared_preprocessing():
  """The in-process Reader and `serving` run the same functions, not copies of them."""
  for name in ("to_canvas", "load_image", "ImageError", "WIDTH_MULTIPLE"):
    assert getattr(predict, name) is getattr(preprocess, name)


# ---- The commands


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                        env=ENV, timeout=timeout)


def test_predict_with_model_reads_as_the_in_process_reader(exported, in_process, lines,
                                                           tmp_path):
  for i in (0, 1, 22):
    Image.fromarray(lines[i]).save(tmp_path / f"line{i}.png")
  out = tmp_path / "readings.csv"
  result = _run("digit_vit.predict", f"--model={exported[0]}", str(tmp_path / "line0.png"),
                str(tmp_path / "line1.png"), str(tmp_path / "line22.png"), f"--output={out}",
                f"--attention={tmp_path / 'maps'}")
  assert result.returncode == 0, result.stderr[-2000:]
  with open(out) as f:
    rows = list(csv.DictReader(f))
  expected = in_process.read([lines[0], lines[1], lines[22]])
  assert [r["digits"] for r in rows] == [p.digits for p in expected]
  for row, p in zip(rows, expected):
    assert float(row["confidence"]) == pytest.approx(p.confidence, abs=2e-6)
    assert f"tokens={p.tokens}" in result.stdout
  assert (tmp_path / "maps" / f"{tmp_path / 'line0.png'}.attention.png".lstrip("/")).is_file()


def test_predict_model_mistakes_are_one_line_and_exit_status_2(exported, tiny_workdir, tmp_path):
  Image.fromarray(np.zeros((28, 60), np.uint8)).save(tmp_path / "x.png")
  image = str(tmp_path / "x.png")
  old = _copy(exported, tmp_path)
  _edit_manifest(old, lambda m: m.update(format_version=0))
  cases = [
      ([f"--model={exported[0]}", f"--workdir={tiny_workdir}", image],
       "error: give one of --workdir"),
      ([f"--model={exported[0]}", "--beam_size=2", image], "error: --beam_size apply to"),
      ([f"--model={old}", image], "error: "),
  ]
  for args, start in cases:
    result = _run("digit_vit.predict", *args)
    assert result.returncode == 2, (args, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), (args, result.stderr)
  assert "format version 0" in lines[0] and "format version 1" in lines[0]


def test_export_of_a_run_without_a_checkpoint_is_one_line(tiny_workdir, tmp_path):
  run = tmp_path / "untrained"
  run.mkdir()
  shutil.copy(tiny_workdir / "config.json", run / "config.json")
  result = _run("digit_vit.export", f"--workdir={run}", f"--output={tmp_path / 'out'}")
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
  assert result.returncode == 1, result.stderr[-2000:]
  assert lines == [f"error: no checkpoint in {run / 'checkpoints'}: train first, or wait for "
                   "the first checkpoint"]
  assert not (tmp_path / "out").exists()
  # Not a run at all, and an --output that holds something else: usage errors (2).
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "a.txt").write_text("mine")
  for args, message in (
      ([f"--workdir={tmp_path / 'nowhere'}", f"--output={tmp_path / 'out'}"],
       f"error: {tmp_path / 'nowhere' / 'config.json'} not found"),
      ([f"--workdir={tiny_workdir}", f"--output={tmp_path / 'notes'}"],
       f"error: --output={tmp_path / 'notes'} holds files and is not an exported reader")):
    result = _run("digit_vit.export", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
  assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_export_replaces_an_earlier_export(exported, tiny_workdir, tmp_path):
  directory = _copy(exported, tmp_path)
  (directory / "stale.jaxexport").write_text("from an older export")
  manifest = export.export_reader(tiny_workdir, directory, checkpoint=20)
  assert manifest["run"]["step"] == 20 and not (directory / "stale.jaxexport").exists()
  assert serving.load(directory).step == 20
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".copy")]  # No staging left.


def test_demo_with_model_serves_the_exported_reader(exported, in_process, lines, monkeypatch):
  # The cache is jax-global: the test process keeps its own (conftest.py).
  monkeypatch.setattr(serving, "enable_compilation_cache", lambda directory=None: None)
  reader = demo.load_reader(model=str(exported[0]))
  assert isinstance(reader, serving.ExportedReader) and reader.batch_size == 1
  server = demo.make_server(reader, "127.0.0.1", 0)
  try:
    info = server.info()
    assert (info["height"], info["width"], info["max_digits"], info["step"]) == (16, 48, 3, 30)
    png = io.BytesIO()
    Image.fromarray(lines[0]).save(png, format="PNG")
    body = json.dumps({"image": "data:image/png;base64,"
                                + base64.b64encode(png.getvalue()).decode()}).encode()
    reading = server.read(body, "application/json")
  finally:
    server.server_close()
  want = in_process.read([lines[0]])[0]
  assert reading["digits"] == want.digits and reading["tokens"] == want.tokens
  assert reading["attention"].startswith("data:image/png;base64,")
  with pytest.raises(ValueError, match="--beam_size apply to --workdir only"):
    demo.load_reader(model=str(exported[0]), beam_size=2)
  assert cli.call(demo, [f"--model={exported[0].parent / 'missing'}"]) == 2
  with pytest.raises(ValueError, match="give one of --workdir"):  # Exclusive, as in predict.
    demo.load_reader("a", model="b")
