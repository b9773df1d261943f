"""`check_config`: every setting of a run checked before anything is created or computed.

A bad field raises `config_lib.ConfigError` naming the field and how to change it, so a run
never fails after hours of training on a setting it could have refused at the start. The
checks of a field live with the code that reads it (the model's `ModelConfig`, the data
modules', `state`, `steps`, `trained.decoding`); this module calls them all and adds the ranges
of the plain numbers.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from digit_vit import config_lib, file_evaluation, losses, state as state_lib, steps, tasks, trained
from digit_vit.models import ModelConfig, tokens

EVAL_SPLITS = ("train", "validation", "test")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# Ranges of the numeric fields (a dotted name, a test, the rule in words). Fields a config does
# not have are skipped (the classifier's configs lack some data fields).
_NUMBER_RULES = (
    ("num_train_steps", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("learning_rate", lambda v: _is_number(v) and math.isfinite(v) and v > 0,
     "a number > 0 (the peak learning rate, e.g. 1.5e-3)"),
    ("warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("end_learning_rate", lambda v: _is_number(v) and 0 <= v <= 1,
     "in [0, 1] (a fraction of learning_rate)"),
    ("b1", lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    ("b2", lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: _is_number(v) and v >= 0, ">= 0"),
    ("grad_clip_norm", lambda v: _is_number(v) and v >= 0, ">= 0 (0 = no clipping)"),
    ("loss.label_smoothing", lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    ("log_every_steps", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("eval_every_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = none)"),
    ("num_eval_examples", lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (all) or >= 1"),
    ("checkpoint_every_steps", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("keep_checkpoints", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("keep_best_checkpoints", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("model.width", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("model.num_heads", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("model.mlp_dim", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("model.encoder_layers", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("model.dropout_rate", lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    ("model.attention_dropout_rate", lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    ("data.curriculum_examples", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    ("data.prefetch", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("data.threads", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = TF default)"),
) + tuple(
    (f"data.augment.{name}", lambda v: _is_number(v) and 0 <= v <= 1, "in [0, 1]")
    for name in ("affine_prob", "elastic_prob", "noise_prob", "contrast_prob", "invert_prob"))


# The model fields only the 'conv' stem reads. With model.patch_embedding='linear' they must
# keep configs/default.py's values: another value would change nothing, and a sweep over it
# would measure nothing.
STEM_FIELDS = ("stem_channels", "stem_depth", "stem_max_channels")


def _field(config, dotted: str, missing=None):
  """config['a']['b'] for 'a.b', or `missing` when the config lacks it."""
  value = config
  for key in dotted.split("."):
    if not hasattr(value, "get") or key not in value:
      return missing
    value = value[key]
  return value


def check_config(config) -> None:
  """Checks every setting a run needs before anything is created or computed.

  Numbers in range (`_NUMBER_RULES`), names among the allowed ones (task, parallelism, data
  name and source, schedule, optimizer, the model's, decoding), and the checks of the modules
  that use them: `ModelConfig` (names, width and heads, patches that tile the canvas), the
  dataset's `MultiDigitMnistConfig.validate` (source, composition, `compose.check_canvas`, split
  sizes), the input pipeline's (train_max_digits, clean_final_steps), the loss's class
  weights, the moving average and CTC, the stem fields a 'linear' patch embedding ignores
  (`STEM_FIELDS`), the batch split over the devices and `trained.decoding`.

  Raises:
    config_lib.ConfigError (a ValueError) saying which field to change and how.
  """
  try:
    _check_config(config)
  except config_lib.ConfigError:
    raise
  except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as error:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    raise config_lib.ConfigError(str(message)) from error


def _check_config(config) -> None:
  """check_config's checks; they raise ValueError (or TypeError, KeyError...) on a bad field."""
  task = tasks.get(config)  # Raises for an unknown task, naming the known ones.
  if config.parallelism not in steps.PARALLELISM:
    raise ValueError(f"config.parallelism={config.parallelism!r} is not one of "
                     f"{steps.PARALLELISM}")
  missing = object()
  for name, ok, rule in _NUMBER_RULES:
    value = _field(config, name, missing)
    if value is not missing and not ok(value):
      raise ValueError(f"config.{name}={value!r} must be {rule}")
  if task.reads_lines and not (_is_int(config.model.decoder_layers)
                               and config.model.decoder_layers >= 1):
    raise ValueError(f"config.model.decoder_layers={config.model.decoder_layers!r} must be an "
                     "integer >= 1 (the reader writes with its decoder)")
  allowed = EVAL_SPLITS + (file_evaluation.SPLITS if task.reads_lines else ())
  bad_splits = [s for s in config.eval_splits if s not in allowed]
  if bad_splits:
    raise ValueError(f"config.eval_splits has {bad_splits}, not among {allowed}")
  _check_data(config, task)
  _check_stem(config)
  model_config = ModelConfig.from_config(config.model)
  if task.reads_lines:
    if model_config.max_length < int(config.max_digits) + 1:
      raise ValueError(f"config.model.max_length={model_config.max_length} must be at least "
                       f"max_digits + 1 = {int(config.max_digits) + 1} (<sos> and the digits)")
    if config.loss.get("class_weights"):
      losses.class_weight_vector(config.loss.class_weights, tokens.VOCAB_SIZE)
  state_lib.check_ema_decay(config)
  steps.check_ctc_weight(config)
  devices, processes = jax.device_count(), jax.process_count()
  for name in ("batch_size", "eval_batch_size"):
    size = config[name]
    if not _is_int(size) or size < 1:
      raise ValueError(f"config.{name}={size!r} must be an integer >= 1")
    if size % devices:
      multiple = max(devices, devices * round(size / devices))
      raise ValueError(
          f"config.{name}={size} cannot be split evenly over the {devices} devices "
          f"({processes} process(es) x {jax.local_device_count()} local devices); set "
          f"--config.{name} to a multiple of {devices}, e.g. {multiple}")
  # The schedule's and the optimizer's names.
  state_lib.create_optimizer(config, state_lib.create_learning_rate_fn(config))
  trained.decoding(config)
  if task.reads_lines:
    trained.read_length(config)
    trained.reader_options(config)


def _check_stem(config) -> None:
  """With the 'linear' patch embedding, each of `STEM_FIELDS` at configs/default.py's value."""
  if config.model.get("patch_embedding") != "linear":
    return
  defaults = config_lib.load("default").model
  for name in STEM_FIELDS:
    value = config.model.get(name, defaults[name])
    if value != defaults[name]:
      raise ValueError(
          f"config.model.{name}={value!r} shapes the 'conv' stem, which "
          f"model.patch_embedding='linear' does not have, so it would change nothing: leave "
          f"it at {defaults[name]!r}, or set --config.model.patch_embedding=conv")


def _check_data(config, task: tasks.Task) -> None:
  """The data section, by the checks of the task's data module."""
  name = config.data.get("name")
  if task.reads_lines:
    if name != "multi_digit_mnist":
      raise ValueError(f"config.data.name={name!r}: the 'read' task reads lines of "
                       "'multi_digit_mnist' (single-image datasets are for task 'classify')")
    from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
    input_pipeline.builder_config_from(config)  # Source, composition, canvas, split sizes.
    input_pipeline.train_max_digits(config)
    start = config.data.get("curriculum_start_digits", 1)
    if config.data.get("curriculum_examples", 0) and not 1 <= start <= int(config.max_digits):
      raise ValueError(f"config.data.curriculum_start_digits={start} must be in "
                       f"1..max_digits={int(config.max_digits)}")
    input_pipeline.clean_from_position(config, 1)
  else:
    from digit_vit.data import classification, sources  # pylint: disable=import-outside-toplevel
    if name not in classification.NAMES:
      raise ValueError(f"config.data.name={name!r} is not one of {classification.NAMES} "
                       "(the 'classify' task's datasets)")
    if name == "mnist_digits":
      sources.check_source(config.data.get("source", "embedded"))
    if int(config.data.get("canvas_padding", 0)) < 0:
      raise ValueError(f"config.data.canvas_padding must be >= 0, got "
                       f"{config.data.canvas_padding}")
