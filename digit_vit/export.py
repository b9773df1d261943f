r"""Exports a trained reader with `jax.export`: a directory that `digit_vit.serving` reads with
jax, numpy and Pillow only, without Flax, TensorFlow or the training code.

  python -m digit_vit.export --workdir=runs/long --output=exports/long \
      [--checkpoint=best|latest|STEP] [--beam_size=1] [--alpha=0.6] [--views=1] \
      [--platforms=cpu,cuda]

What it writes (`serving` documents the format, version `serving.FORMAT_VERSION`):
  manifest.json, params.npz, and per width bucket W of the run's `config.width_buckets`:
  read_w<W>.jaxexport (preprocessed batch float32 [b, H, W, 1] and widths int32 [b] -> tokens
  int32 [b, L], per-token probabilities float32 [b, L], the line confidence float32 [b] and its
  log float32 [b], b symbolic) and attention_w<W>.jaxexport (the cross-attention maps).

The reading function is `decode.decode` as `predict.Reader` calls it, with the run's decode
settings (`trained.decoding`, overridable here), its reading length (`trained.read_length`) and
its calibration temperature (`calibration.load_temperature`, 1 when the run has none) built in.
The parameters are arguments of the exported functions, stored once beside them in params.npz.
The manifest also records the training config, the commit the run was trained at (its
report.json) and the one that exported it, and the run's measured test/wild/long metrics for
the exported checkpoint (an `evaluate` JSON of that step and decoding, else report.json when it
measured that step).

Errors: one line on stderr. Exit status 2 for a mistake on the command line (a missing flag, a
--workdir that is no reading run, a bad --checkpoint or decoding value, an --output that
cannot be written or holds something else than an export); 1 when the run has no checkpoint to
export, or the checkpoint asked for is damaged.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from digit_vit import (calibration, checkpointing, cli, decode, environment, logs,
                       preprocess, serving, trained)
from digit_vit.data import buckets as width_buckets
from digit_vit.models import tokens
from digit_vit.models.reader import ModelConfig

DEFAULT_PLATFORMS = ("cpu", "cuda")
# Metric names kept in the manifest: those of these splits (every key `evaluate` writes).
METRIC_SPLITS = ("test", "wild", "long")


def _keeps_average(workdir: pathlib.Path) -> bool:
  """Whether the run kept a moving average of its parameters (then `trained.restore_params`
  exports it); True when config.json cannot tell."""
  try:
    return float(json.loads((workdir / "config.json").read_text()).get("ema_decay") or 0) > 0
  except (OSError, ValueError, AttributeError, TypeError):
    return True


def _evaluations_of(workdir: pathlib.Path, step: int):
  """(path, record) of each `evaluate` JSON of the parameters an export of `step` holds: that
  step alone, no ensemble, and the moving average where the run kept one."""
  averaged = _keeps_average(workdir)
  for path in sorted(workdir.glob("evaluation_*.json")):
    try:
      record = json.loads(path.read_text())
    except (OSError, ValueError):
      continue
    # `ema` is False both for a --noema evaluation and for any of a run without an average.
    if (isinstance(record, dict) and record.get("steps") == [step] and not record.get("ensemble")
        and not (averaged and record.get("ema") is False)):
      yield path, record


def _fitted_for(fit: Any, step: int, reading: trained.Decoding) -> bool:
  """Whether a calibration record was fitted on the readings of `step` decoded as `reading`."""
  if not isinstance(fit, dict) or fit.get("step") != step:
    return False
  decoding = fit.get("decode") or {}
  return (decoding.get("beam_size") == reading.beam_size
          and decoding.get("views") == reading.views
          and (reading.beam_size == 1 or decoding.get("alpha") == reading.alpha))


def calibration_of(workdir: str | os.PathLike, step: int | None = None,
                   reading: trained.Decoding | None = None) -> dict[str, Any]:
  """{'temperature', 'fit'}: the temperature built into an export, and the record of its fit
  (the step and decoding, the validation ECE and NLL before and after) or None.

  The run's calibration.json (`calibration.load_temperature`, 1.0 without one), unless it was
  fitted for another step or decoding than `step` read as `reading` and an `evaluate` JSON of
  that step alone (the moving average where the run kept one) fitted one for exactly that
  reading: a temperature fitted for 25 views is too low for one view's sharper confidences.
  """
  workdir = pathlib.Path(workdir)
  temperature = float(calibration.load_temperature(workdir))
  path = workdir / calibration.CALIBRATION_FILE
  try:
    fit = json.loads(path.read_text()) if path.is_file() else None
  except (OSError, ValueError):
    fit = None
  if reading is None or fit is None or _fitted_for(fit, step, reading):
    return {"temperature": temperature, "fit": fit}
  for path, record in _evaluations_of(workdir, step):
    found = record.get("calibration")
    if _fitted_for(found, step, reading) and isinstance(found.get("temperature"), (int, float)):
      return {"temperature": float(found["temperature"]), "fit": {**found, "file": path.name}}
  return {"temperature": temperature, "fit": fit}


def parameter_names(params) -> tuple[list[str], list[np.ndarray], Any]:
  """(names 'decoder/logits/bias', host arrays, treedef) of a parameter tree's leaves, in
  `jax.tree.flatten` order."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  names, arrays = [], []
  for path, leaf in with_paths:
    names.append("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path))
    arrays.append(np.asarray(jax.device_get(leaf)))
  if len(set(names)) != len(names):
    raise ValueError("parameter names collide after flattening: cannot store them by name")
  return names, arrays, treedef


def reading_function(model_config: ModelConfig, treedef, *, beam_size: int, alpha: float,
                     views: int, max_length: int, temperature: float, reader: str = "decoder",
                     ctc_weight: float = decode.JOINT_CTC_WEIGHT):
  """The exported reading function.

  (params: list of the leaves, images float32 [b, H, W, C], widths int32 [b]) ->
  (tokens int32 [b, max_length], token_probs float32 [b, max_length] (1 after `<eos>`),
   confidence float32 [b] = exp(log_prob), log_prob float32 [b]): `decode.decode` as
  `predict.Reader` calls it (one model, an ensemble of one, read by `reader`: the decoder,
  the CTC head or both, weighted by `ctc_weight`), calibrated by `temperature`.
  """
  def read(leaves, images, widths):
    params = jax.tree.unflatten(treedef, leaves)
    outputs, log_prob, token_log_probs = decode.decode(
        (model_config,), (params,), images, widths=widths, beam_size=beam_size, alpha=alpha,
        views=views, max_length=max_length, temperature=temperature, token_log_probs=True,
        reader=reader, ctc_weight=ctc_weight)
    return outputs, jnp.exp(token_log_probs), jnp.exp(log_prob), log_prob
  return read


def attention_function(model_config: ModelConfig, treedef):
  """(params leaves, images [b, H, W, C], widths int32 [b], tokens int32 [b, L]) -> float32
  [b, L, H, W]: `predict.cross_attention`."""
  from digit_vit import predict  # pylint: disable=import-outside-toplevel

  def attention(leaves, images, widths, outputs):
    return predict.cross_attention(model_config, jax.tree.unflatten(treedef, leaves), images,
                                   widths, outputs)
  return attention


def measured_metrics(workdir: str | os.PathLike, step: int,
                     reading: trained.Decoding) -> tuple[dict[str, float], dict | None]:
  """The run's measured metrics of the test, wild and long splits for the parameters of `step`.

  From an `evaluate` JSON (`evaluation_*.json`) of that step alone, without an ensemble, with
  the moving average where the run kept one, preferring one that decoded as `reading` and the
  one with the most splits; else report.json where its final evaluation was of that step.

  Returns:
    ({'test_exact_match': ..., 'wild_cer': ..., ...}, {'file', 'step', 'beam_size', 'views'})
    or ({}, None) when nothing measured these parameters.
  """
  workdir = pathlib.Path(workdir)
  candidates = []
  for path, record in _evaluations_of(workdir, step):
    same = (record.get("beam_size") == reading.beam_size and record.get("views") == reading.views)
    splits = sum(any(k.startswith(f"{s}_") for k in record) for s in METRIC_SPLITS)
    candidates.append(((same, splits), path, record))
  report_path = workdir / "report.json"
  if not candidates and report_path.is_file():
    try:
      record = json.loads(report_path.read_text())
    except (OSError, ValueError):
      record = {}
    if isinstance(record, dict) and record.get("steps") == step:
      candidates.append(((True, 0), report_path, {
          **record, "beam_size": record.get("decode_beam_size"),
          "views": record.get("decode_views")}))
  if not candidates:
    return {}, None
  _, path, record = max(candidates, key=lambda c: c[0])
  metrics = {k: v for k, v in record.items()
             if k.split("_", 1)[0] in METRIC_SPLITS and isinstance(v, (int, float))
             and not isinstance(v, bool)}
  return metrics, {"file": path.name, "step": step, "beam_size": record.get("beam_size"),
                   "views": record.get("views")}


def trained_commit(workdir: str | os.PathLike) -> dict | None:
  """The commit a run was trained at ({'commit', 'dirty'}, from its report.json), or None."""
  try:
    report = json.loads((pathlib.Path(workdir) / "report.json").read_text())
  except (OSError, ValueError):
    return None
  return (report.get("environment") or {}).get("code") if isinstance(report, dict) else None


def check_output(output: str | os.PathLike) -> str | None:
  """Why --output cannot take an export, or None: it must be a new directory, an empty one, or
  an earlier export (replaced whole), under a directory that can be written."""
  path = pathlib.Path(output)
  if path.exists():
    if not path.is_dir():
      return f"--output={output} is a file: give a directory for the exported reader"
    if any(path.iterdir()) and not (path / serving.MANIFEST).is_file():
      return (f"--output={output} holds files and is not an exported reader: give a new or "
              "empty directory")
  parent = next(p for p in (path.parent, *path.parent.parents) if p.exists())
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    return f"--output={output}: cannot write in {parent}"
  return None


def export_reader(workdir: str | os.PathLike, output: str | os.PathLike, *,
                  checkpoint: trained.Checkpoint = "best", beam_size: int | None = None,
                  alpha: float | None = None, views: int | None = None,
                  platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict[str, Any]:
  """Exports a reading run's checkpoint into `output` (replacing an earlier export there).

  The directory is written beside `output` and renamed into place when complete, so an
  interrupted export never leaves a half-written reader under that name.

  Args:
    workdir: a training run of config.task 'read'.
    checkpoint: 'best', 'latest' or a step (`trained.restore_params`).
    beam_size, alpha, views: decoding built into the export (default: the run's config.decode).
    platforms: the backends the export runs on ('cpu', 'cuda', 'rocm', 'tpu').

  Returns:
    the manifest written.

  Raises:
    FileNotFoundError: no config.json (not a run) or no checkpoint yet (the message says which).
    ValueError: a classifier run, a bad decoding value, no checkpoint of that step, a
      calibration.json without a valid temperature;
      checkpointing.CorruptCheckpointError for a damaged one.
  """
  workdir = pathlib.Path(workdir)
  config = trained.load_config(workdir, task="read")
  reading = trained.decoding(config, beam_size, alpha, views)
  reader = trained.reader_options(config)
  # The weight says something only of a joint reading.
  joint_weight = {"ctc_weight": reader["ctc_weight"]} if reader["reader"] == "joint" else {}
  max_length = trained.read_length(config)
  bucket_widths = width_buckets.width_buckets(config)
  model_config = ModelConfig.from_config(config.model)
  params, step = trained.restore_params(workdir, config, checkpoint)
  calibrated = calibration_of(workdir, step, reading)
  temperature = calibrated["temperature"]
  names, arrays, treedef = parameter_names(params)
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
  batch, = jax.export.symbolic_shape("b")
  height, channels = model_config.image_height, model_config.image_channels
  read = jax.jit(reading_function(model_config, treedef, beam_size=reading.beam_size,
                                  alpha=reading.alpha, views=reading.views,
                                  max_length=max_length, temperature=temperature,
                                  **reader))
  attention = jax.jit(attention_function(model_config, treedef))

  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
  try:
    functions: dict[str, dict[str, dict[str, str]]] = {"read": {}, "attention": {}}
    for width in bucket_widths:
      images = jax.ShapeDtypeStruct((batch, height, width, channels), jnp.float32)
      widths = jax.ShapeDtypeStruct((batch,), jnp.int32)
      outputs = jax.ShapeDtypeStruct((batch, max_length), jnp.int32)
      for kind, fn, args, name in (
          ("read", read, (specs, images, widths), serving.read_file_name(width)),
          ("attention", attention, (specs, images, widths, outputs),
           serving.attention_file_name(width))):
        exported = jax.export.export(fn, platforms=tuple(platforms))(*args)
        (staging / name).write_bytes(exported.serialize())
        functions[kind][str(width)] = {"file": name, "sha256": serving.sha256(staging / name)}
    np.savez(staging / serving.PARAMS_FILE, **dict(zip(names, arrays)))
    metrics, metrics_source = measured_metrics(workdir, step, reading)
    manifest = {
        "format": serving.FORMAT,
        "format_version": serving.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vocabulary": {"tokens": list(tokens.TOKEN_NAMES),
                       "digits": list(range(tokens.NUM_DIGITS)), "sos": tokens.SOS,
                       "eos": tokens.EOS, "pad": tokens.PAD},
        "image": {"height": height, "channels": channels, "buckets": list(bucket_widths),
                  "width_multiple": preprocess.WIDTH_MULTIPLE,
                  "polarity": "ink bright (1) on black (0)",
                  "range": [0.0, 1.0]},
        "decode": {"reader": reader["reader"], **joint_weight, "beam_size": reading.beam_size,
                   "alpha": reading.alpha, "views": reading.views, "max_length": max_length,
                   "max_digits": max_length - 1},
        "calibration": calibrated,
        "functions": functions,
        "inputs": {"params": "the arrays of params.npz in parameters.names order",
                   "images": "float32 [batch, height, bucket width, channels]",
                   "widths": "int32 [batch]: each line's width in pixels"},
        "outputs": {"tokens": "int32 [batch, max_length] raw outputs without <sos>",
                    "token_probs": "float32 [batch, max_length] (1 after <eos>)",
                    "confidence": "float32 [batch]", "log_prob": "float32 [batch]"},
        "parameters": {"file": serving.PARAMS_FILE,
                       "sha256": serving.sha256(staging / serving.PARAMS_FILE),
                       "names": names, "count": int(sum(a.size for a in arrays))},
        "jax": {"version": jax.__version__, "platforms": list(platforms),
                "calling_convention_version": exported.calling_convention_version},
        "run": {"workdir": str(workdir.resolve()), "checkpoint": str(checkpoint), "step": step,
                "config": json.loads(config.to_json_best_effort()),
                "commit": trained_commit(workdir), "exported_by": environment.git_commit(),
                "metrics": metrics, "metrics_source": metrics_source},
    }
    (staging / serving.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _replace(staging, output)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def _replace(staging: pathlib.Path, output: pathlib.Path) -> None:
  """Renames the complete `staging` directory to `output`, moving an earlier one aside first
  and deleting it after."""
  old = None
  if output.exists():
    old = output.with_name(f".{output.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    output.rename(old)
  staging.rename(output)
  os.chmod(output, 0o755)  # mkdtemp made it private to its owner.
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global."""
  cli.define_reader_flags(flag_values, model=False, ensemble=False)
  flags.DEFINE_string("output", None, "The directory to write the exported reader to (new, "
                      "empty, or an earlier export, which is replaced).", flag_values=flag_values)
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "Backends the export runs on.",
                    flag_values=flag_values)


def main(argv):
  if len(argv) > 1:
    return cli.error(f"unexpected arguments {argv[1:]}", cli.USAGE)
  if not FLAGS.workdir:
    return cli.error("--workdir is required: a reading run's directory", cli.USAGE)
  if not FLAGS.output:
    return cli.error("--output is required: the directory to write the exported reader to",
                     cli.USAGE)
  problem = check_output(FLAGS.output)
  if problem:
    return cli.error(problem, cli.USAGE)
  try:  # The run and the decoding, before any checkpoint is read.
    config = trained.load_config(FLAGS.workdir, task="read")
    trained.decoding(config, FLAGS.beam_size, FLAGS.alpha, FLAGS.views)
  except (FileNotFoundError, ValueError) as e:
    return cli.error(str(e), cli.USAGE)
  logs.quiet_libraries()
  try:
    manifest = export_reader(FLAGS.workdir, FLAGS.output, checkpoint=FLAGS.checkpoint,
                             beam_size=FLAGS.beam_size, alpha=FLAGS.alpha, views=FLAGS.views,
                             platforms=FLAGS.platforms)
  except (FileNotFoundError, checkpointing.CorruptCheckpointError) as e:
    return cli.error(str(e), cli.FAILURE)  # No checkpoint yet, or a damaged one.
  except ValueError as e:  # No checkpoint of that step; a platform jax does not know.
    return cli.error(str(e), cli.USAGE)
  run = manifest["run"]
  size = sum(f.stat().st_size for f in pathlib.Path(FLAGS.output).iterdir())
  print(f"exported {FLAGS.workdir} (step {run['step']}, beam {manifest['decode']['beam_size']}, "
        f"{manifest['decode']['views']} view(s), temperature "
        f"{manifest['calibration']['temperature']:g}, buckets {manifest['image']['buckets']}) "
        f"to {FLAGS.output} ({size / 1e6:.1f} MB)")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
