"""Training and evaluation: `train_and_evaluate(config, workdir)`.

One loss function (`loss_fn`, sums of a masked weighted cross-entropy) serves both tasks:

- 'read': the DigitReader, teacher-forced on the target sequence shifted right; evaluated by
  free-running greedy decoding (exact match, token accuracy, CER, per length, and the counts
  of outputs with no <eos>, the wrong length or the digits in the wrong order) plus the
  teacher-forced loss;
- 'classify': the ViTClassifier on single images; evaluated by accuracy and loss.

With `config.loss.ctc_weight` > 0 a reader's training objective also sums a CTC loss of its
encoder's columns (`model.ctc_head`, joint CTC-attention); decoding and evaluation stay the
decoder's.

Data parallelism. `config.parallelism = 'jit'` (the default) compiles the step with `jax.jit`
over a 1-D ('data',) mesh of every device of every process: the train state is replicated, the
batch is sharded on its first axis, and XLA inserts the gradient all-reduce. Host-local numpy
batches become global arrays with `jax.make_array_from_process_local_data`. `'pmap'` runs the
same loss under `jax.pmap`, adding sums and gradients with `lax.psum`. Either way the loss is
normalised once by the global sum of token weights, so any split of the batch gives the same
update. The canonical state is always the jit form (global arrays): evaluation and checkpoints
use it, and the pmap path converts to and from it around its steps.

Moving average. With `config.ema_decay` > 0 the state also keeps an exponential moving average
of the parameters, updated inside the step; every evaluation, the best checkpoint's metric and
reading (`trained.restore_params`) use it, and checkpoints hold both.

Randomness: dropout at step t uses fold_in(state.rng, t) (and the device index under pmap), so a
resumed run draws exactly what an uninterrupted one would; the input order is the pipeline's,
resumed with `start_step`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from digit_vit import (checkpointing, config_lib, decode, environment, file_evaluation, losses,
                       metrics, predict, reporting, trained, xla_options)
from digit_vit.models import ModelConfig, ViTClassifier, build_model, tokens
from digit_vit.models.reader import ctc_frame_mask

PARALLELISM = ("jit", "pmap")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")


class TrainState(train_state.TrainState):
  """Step, params, optimiser state, the base dropout key (a raw uint32 [2] key) and, when
  `config.ema_decay` > 0, an exponential moving average of the params (else None)."""
  rng: jax.Array
  ema_params: Any = None

  def eval_params(self):
    """The parameters to evaluate and read with: the moving average when kept."""
    return self.params if self.ema_params is None else self.ema_params


# ----------------------------------------------------------------------------------------------
# Set-up


TASKS = ("read", "classify")
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
  weights, the moving average, SAM and CTC, the batch split over the devices and
  `trained.decoding`.

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
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not one of {TASKS}")
  if config.parallelism not in PARALLELISM:
    raise ValueError(f"config.parallelism={config.parallelism!r} is not one of {PARALLELISM}")
  missing = object()
  for name, ok, rule in _NUMBER_RULES:
    value = _field(config, name, missing)
    if value is not missing and not ok(value):
      raise ValueError(f"config.{name}={value!r} must be {rule}")
  if config.task == "read" and not (_is_int(config.model.decoder_layers)
                                    and config.model.decoder_layers >= 1):
    raise ValueError(f"config.model.decoder_layers={config.model.decoder_layers!r} must be an "
                     "integer >= 1 (the reader writes with its decoder)")
  allowed = EVAL_SPLITS + (file_evaluation.SPLITS if config.task == "read" else ())
  bad_splits = [s for s in config.eval_splits if s not in allowed]
  if bad_splits:
    raise ValueError(f"config.eval_splits has {bad_splits}, not among {allowed}")
  _check_data(config)
  model_config = ModelConfig.from_config(config.model)
  if config.task == "read":
    if model_config.max_length < int(config.max_digits) + 1:
      raise ValueError(f"config.model.max_length={model_config.max_length} must be at least "
                       f"max_digits + 1 = {int(config.max_digits) + 1} (<sos> and the digits)")
    if config.loss.get("class_weights"):
      losses.class_weight_vector(config.loss.class_weights, tokens.VOCAB_SIZE)
  check_ema_decay(config)
  check_sam_rho(config)
  check_ctc_weight(config)
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
  create_optimizer(config, create_learning_rate_fn(config))  # Schedule and optimizer names.
  trained.decoding(config)
  if config.task == "read":
    trained.read_length(config)


def _check_data(config) -> None:
  """The data section, by the checks of the task's data module."""
  name = config.data.get("name")
  if config.task == "read":
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


def create_mesh() -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh of all devices of all processes."""
  return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))


def create_learning_rate_fn(config) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then `schedule` down to
  `learning_rate * end_learning_rate` at `num_train_steps` ('constant' stays at the peak)."""
  peak, warmup = float(config.learning_rate), int(config.warmup_steps)
  total, end = int(config.num_train_steps), float(config.learning_rate) * config.end_learning_rate
  decay_steps = max(total - warmup, 1)
  if config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_learning_rate)
  elif config.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif config.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.schedule={config.schedule!r} is not one of {SCHEDULES}")
  warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
  return optax.join_schedules([warmup_fn, decay], boundaries=[warmup])


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """AdamW (or SGD with momentum b1) after clipping by global norm (`grad_clip_norm` > 0).

  Weight decay applies to matrices only, not to biases and LayerNorm scales."""
  if config.optimizer == "adamw":
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    optimizer = optax.adamw(learning_rate_fn, b1=config.b1, b2=config.b2,
                            weight_decay=config.weight_decay, mask=decay_mask)
  elif config.optimizer == "sgd":
    optimizer = optax.sgd(learning_rate_fn, momentum=config.b1)
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r} is not one of {OPTIMIZERS}")
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
  return optimizer


def check_sam_rho(config) -> float:
  """config.sam_rho as a float >= 0; 0 = plain gradients (no sharpness-aware step)."""
  rho = float(config.get("sam_rho", 0.0))
  if rho < 0:
    raise ValueError(f"config.sam_rho={rho} must be >= 0 (0 = off; 0.05 is the SAM paper's)")
  return rho


def check_ctc_weight(config) -> float:
  """config.loss.ctc_weight (0 = no CTC loss), checked against the task and model."""
  weight = float(config.loss.get("ctc_weight", 0.0) or 0.0)
  if weight < 0:
    raise ValueError(f"config.loss.ctc_weight={weight} must be >= 0 (0 = no CTC loss)")
  if weight == 0:
    return 0.0
  if config.task != "read" or not config.model.get("ctc_head", False):
    raise ValueError(f"config.loss.ctc_weight={weight} needs the reader's CTC head: set "
                     "--config.model.ctc_head=True (task 'read'), or ctc_weight=0")
  columns = ModelConfig.from_config(config.model).ctc_frames
  needed = 2 * int(config.max_digits) - 1
  if columns < needed:
    raise ValueError(
        f"config.loss.ctc_weight needs at least 2 * max_digits - 1 = "
        f"{needed} patch columns to spell every line (a blank between "
        f"repeated digits); model.patch_size={tuple(config.model.patch_size)} gives {columns}: "
        "use narrower patches or ctc_weight=0")
  return weight


def check_ema_decay(config) -> float:
  """config.ema_decay as a float in [0, 1); 0 = no moving average."""
  decay = float(config.get("ema_decay", 0.0))
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"config.ema_decay={decay} must be in [0, 1): 0 keeps no moving average, "
                     "0.999 averages over about the last 1,000 steps")
  return decay


def update_ema(ema_params, params, decay: float, step):
  """One step of the moving average of the parameters.

  The decay is capped at (1 + step) / (10 + step), so the average is not held back by the
  initial parameters during the first steps (as TensorFlow's ExponentialMovingAverage with
  `num_updates`).

  Args:
    ema_params, params: pytrees of the same structure.
    decay: the decay once the run is long under way, in [0, 1).
    step: the optimiser step that produced `params` (0 for the first).
  """
  step = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)


def create_train_state(config, model, tx, mesh) -> TrainState:
  """Initialises parameters (float32), optimiser state and, with `config.ema_decay` > 0, the
  parameters' moving average, replicated over `mesh`."""
  height, width = config.model.image_height, config.model.image_width
  images = jnp.zeros((1, height, width, config.model.image_channels), jnp.float32)
  inputs = (images,)
  if config.task == "read":
    inputs += (jnp.full((1, config.max_digits + 1), tokens.SOS, jnp.int32),)

  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    params = model.init({"params": params_rng}, *inputs)["params"]
    ema_params = params if check_ema_decay(config) > 0 else None
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=dropout_rng,
                             ema_params=ema_params)

  replicated = NamedSharding(mesh, P())
  return jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.seed))


# ----------------------------------------------------------------------------------------------
# Loss and steps


def _logits_and_targets(config, model, params, batch, *, train: bool, dropout_rng=None,
                        return_ctc: bool = False):
  """Teacher-forced logits and their targets: read -> [b, L-1, vocab] and [b, L-1];
  classify -> [b, classes] and [b]. With `return_ctc` (read only) the CTC head's logits
  [b, columns, 11] come third."""
  rngs = {"dropout": dropout_rng} if train else None
  if config.task == "read":
    decoder_inputs, targets = tokens.split_decoder_io(batch["tokens"])
    outputs = model.apply({"params": params}, batch["image"], decoder_inputs,
                          widths=batch.get("width"), train=train, rngs=rngs,
                          return_ctc=return_ctc)
    return (outputs[0], targets, outputs[1]) if return_ctc else (outputs, targets)
  return model.apply({"params": params}, batch["image"], train=train, rngs=rngs), batch["label"]


def loss_fn(params, batch, *, config, model, train: bool, dropout_rng=None,
            label_smoothing: float = 0.0):
  """The one loss: summed weighted cross-entropy over a (local or global) batch.

  In training, with `config.loss.ctc_weight` > 0, the objective adds that weight times the
  summed CTC loss of the reader's CTC head (`losses.ctc_loss`): still a sum, divided once by
  the global token weight as the cross-entropy is.

  Args:
    params: model parameters.
    batch: dict with `image` [b, H, W, C] and `tokens` int32 [b, L] (read) or `label` int32
      [b] (classify); optional `mask` bool [b], and `width` int32 [b] (read: each line's width
      in pixels; the image is padded past it to the batch's width bucket).

  Returns:
    (objective_sum, sums): sums has `loss` (the cross-entropy sum), `weight` (the sum of token
    weights; the mean loss is loss / weight), `correct`, `count` (teacher-forced accuracy) and,
    with the CTC loss on, `ctc` and `lines` (its sum, and the lines it is summed over).
  """
  ctc_weight = check_ctc_weight(config) if train else 0.0
  logits, targets, *ctc_logits = _logits_and_targets(
      config, model, params, batch, train=train, dropout_rng=dropout_rng,
      return_ctc=ctc_weight > 0)
  # <pad> and class weights are token notions; a classifier's labels are all counted.
  is_read = config.task == "read"
  class_weights = None
  if is_read and config.loss.class_weights:
    class_weights = losses.class_weight_vector(config.loss.class_weights, logits.shape[-1])
  weights = losses.token_weights(targets, mask=batch.get("mask"),
                                 ignore_pad=is_read and config.loss.ignore_pad,
                                 class_weights=class_weights)
  loss_sum, weight_sum = losses.weighted_cross_entropy(logits, targets, weights,
                                                       label_smoothing=label_smoothing)
  correct, count = metrics.weighted_accuracy(logits, targets, weights)
  sums = {"loss": loss_sum, "weight": weight_sum, "correct": correct, "count": count}
  if ctc_weight <= 0:
    return loss_sum, sums
  frame_mask = None
  if "width" in batch:  # The frames of the width padding are no part of the line.
    frame_mask = ctc_frame_mask(model.config, batch["width"], batch["image"].shape[2])
  ctc_sum, lines = losses.ctc_loss(ctc_logits[0], batch["tokens"], mask=batch.get("mask"),
                                   frame_mask=frame_mask)
  return loss_sum + ctc_weight * ctc_sum, {**sums, "ctc": ctc_sum, "lines": lines}


def train_step(state: TrainState, batch, *, config, model, learning_rate_fn,
               axis_name: str | None = None):
  """One optimiser step on `batch`.

  Under jit the batch is the global one; under pmap (`axis_name` set) it is one device's
  part, and sums and gradients are added over `axis_name` before dividing once by the global
  weight, so both give the same update.

  Returns:
    (new state, metrics: loss, accuracy, grad_norm, learning_rate as float32 scalars).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
  grad_fn = jax.grad(functools.partial(
      loss_fn, config=config, model=model, train=True, dropout_rng=dropout_rng,
      label_smoothing=config.loss.label_smoothing), has_aux=True)

  def mean_grads(params):  # Gradients of the mean loss over the global batch, and the sums.
    grads, sums = grad_fn(params, batch)
    if axis_name is not None:
      grads, sums = jax.lax.psum((grads, sums), axis_name)
    weight = jnp.maximum(sums["weight"], 1e-9)
    return jax.tree.map(lambda g: g / weight, grads), sums, weight

  grads, sums, weight = mean_grads(state.params)
  rho = check_sam_rho(config)
  if rho > 0:
    # Sharpness-aware minimisation (Foret et al. 2021): descend with the gradient taken where
    # the loss rises fastest within an L2 ball of radius rho (the same batch and dropout), which
    # favours flat minima. The loss and accuracy logged stay those at the parameters themselves.
    scale = rho / jnp.maximum(optax.global_norm(grads), 1e-12)
    perturbed = jax.tree.map(lambda p, g: p + scale * g, state.params, grads)
    grads, _, _ = mean_grads(perturbed)
  new_state = state.apply_gradients(grads=grads)
  if state.ema_params is not None:
    new_state = new_state.replace(ema_params=update_ema(
        state.ema_params, new_state.params, check_ema_decay(config), state.step))
  step_metrics = {
      "loss": sums["loss"] / weight,
      "accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0),
      "grad_norm": optax.global_norm(grads),
      "learning_rate": learning_rate_fn(state.step),
  }
  if "ctc" in sums:
    step_metrics["ctc_loss"] = sums["ctc"] / jnp.maximum(sums["lines"], 1.0)  # Per line.
  return new_state, step_metrics


def eval_step(params, batch, ensemble_params=(), *, config, model, beam_size: int = 1,
              alpha: float = 0.6, views: int = 1, ensemble_configs=()):
  """Metric sums of one evaluation batch (padding rows, mask False, count for nothing).

  Args:
    beam_size, alpha, views: how a reader decodes (`decode.decode`; a classifier takes views
      only); training evaluates greedily on the images alone.
    ensemble_params, ensemble_configs: further models (their params and `ModelConfig`s) that
      read together with `params`: each token (`decode.greedy_decode`) or label picked by the
      mean probability over all of them; the (teacher-forced) loss stays that of `params` alone.

  Returns:
    (sums, predictions): sums as in `metrics` plus the teacher-forced `loss` and `weight`;
    predictions are the raw free-running outputs int32 [b, max_digits + 1] (read) or the
    predicted labels int32 [b] (classify).
  """
  _, sums = loss_fn(params, batch, config=config, model=model, train=False)
  loss_sums = {"loss": sums["loss"], "weight": sums["weight"]}
  if config.task == "read":
    # A lone model is an ensemble of one to `decode`.
    # A line of the split has at most max_digits digits: a reading that has not stopped by
    # then is wrong already, so decoding further only costs time.
    outputs, _ = decode.decode((model.config, *ensemble_configs), (params, *ensemble_params),
                               batch["image"], widths=batch.get("width"), beam_size=beam_size,
                               alpha=alpha, views=views,
                               max_length=min(config.max_digits + 2, model.config.max_length))
    _, targets = tokens.split_decoder_io(batch["tokens"])
    return {**metrics.reading_sums(outputs, targets, batch["mask"],
                                   max_digits=config.max_digits), **loss_sums}, outputs
  if ensemble_configs or views > 1:
    # Labels as a reader picks tokens: by the mean probability over the models and the views
    # (shifted copies, edges filled with 0: the background of digits read unnormalised).
    def member_log_probs(c, p):
      return decode.map_over_views(lambda x: jax.nn.log_softmax(
          ViTClassifier(c).apply({"params": p}, x).astype(jnp.float32)), batch["image"], views)
    log_probs = [member_log_probs(c, p) for c, p in ((model.config, params),
                                                     *zip(ensemble_configs, ensemble_params))]
    logits = decode.mean_over_models_and_views(log_probs, views)
  else:
    logits, _ = _logits_and_targets(config, model, params, batch, train=False)
  predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return {**metrics.classification_sums(logits, batch["label"], batch["mask"]),
          **loss_sums}, predictions


class Stepper:
  """Runs compiled train steps on host-local numpy batches in the configured parallel style.

  The state goes in and out in the canonical (jit, global-array) form via `to_canonical`;
  under pmap the stepper keeps its own per-device copy between calls.
  """

  def __init__(self, config, model, learning_rate_fn, mesh):
    self.mesh = mesh
    self.parallelism = config.parallelism
    self.replicated = NamedSharding(mesh, P())
    self.data_sharding = NamedSharding(mesh, P("data"))
    step = functools.partial(train_step, config=config, model=model,
                             learning_rate_fn=learning_rate_fn)
    if self.parallelism == "jit":
      self._step = xla_options.jit(step, in_shardings=(self.replicated, self.data_sharding),
                                   out_shardings=(self.replicated, self.replicated),
                                   donate_argnums=0)
    else:
      self._step = jax.pmap(functools.partial(step, axis_name="batch"), axis_name="batch",
                            donate_argnums=0)
    self._pmap_state = None

  @property
  def jit_step(self):
    """The jitted (state, global batch) -> (state, metrics) step; it donates the state."""
    if self.parallelism != "jit":
      raise ValueError(f"jit_step exists for parallelism='jit', not {self.parallelism!r}")
    return self._step

  def global_batch(self, batch):
    """Host-local numpy batch -> global arrays sharded over the mesh's 'data' axis."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharding, x), batch)

  def __call__(self, state, batch):
    """(canonical state or None after the first call under pmap, local batch) -> metrics.

    Returns the new canonical state (jit) or None (pmap: call `to_canonical`), and the
    step's metrics as device arrays (not synchronised, so steps queue up)."""
    if self.parallelism == "jit":
      return self._step(state, self.global_batch(batch))
    if self._pmap_state is None:
      n = jax.local_device_count()
      self._pmap_state = jax.tree.map(
          lambda x: np.broadcast_to(np.asarray(x.addressable_data(0)), (n,) + x.shape), state)
    local = jax.tree.map(lambda x: x.reshape((jax.local_device_count(), -1) + x.shape[1:]),
                         batch)
    self._pmap_state, step_metrics = self._step(self._pmap_state, local)
    return None, jax.tree.map(_first_replica, step_metrics)

  def to_canonical(self, state):
    """The current state as replicated global arrays (the pmap copy, if any, is dropped)."""
    if self._pmap_state is None:
      return state
    pmap_state, self._pmap_state = self._pmap_state, None
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self.replicated, np.asarray(_first_replica(x))), pmap_state)


def _first_replica(x: jax.Array) -> jax.Array:
  """Device 0's copy of a pmap output [devices, ...] -> [...], without gathering the others.

  Its shard keeps the device axis (of size 1) where pmap is built on shard_map (JAX >= 0.8)
  and drops it under the older PmapSharding."""
  data = x.addressable_shards[0].data
  return data[0] if data.ndim == x.ndim else data


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded on axis 0, in order (its part of the batch)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


class Evaluator:
  """Evaluates parameters on a split with a compiled `eval_step` decoding as asked."""

  def __init__(self, config, model, mesh, input_module, *, beam_size: int = 1,
               alpha: float = 0.6, views: int = 1, ensemble=()):
    """
    Args:
      ensemble: further models [(ModelConfig, params)] of the same task that read together
        with the params evaluated (`eval_step`).
    """
    self.config = config
    self.input_module = input_module
    self.data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    self.ensemble = tuple(ensemble)  # [(ModelConfig, params)], as given.
    self._ensemble_params = tuple(params for _, params in ensemble)
    step = functools.partial(eval_step, config=config, model=model, beam_size=beam_size,
                             alpha=alpha, views=views,
                             ensemble_configs=tuple(c for c, _ in ensemble))
    self._step = xla_options.jit(step,
                                 in_shardings=(replicated, self.data_sharding, replicated),
                                 out_shardings=(replicated, self.data_sharding))

  def _run(self, params, split: str, num_examples: int):
    """Yields (host-local batch, metric sums, host-local predictions) batch by batch."""
    # The split's first `num_examples` lines (all for <= 0), every one once, bucket by bucket.
    batches = self.input_module.eval_iterator(self.config, split,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count(),
                                              num_examples=num_examples)
    for batch in batches:
      global_batch = jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self.data_sharding, x), batch)
      sums, predictions = self._step(params, global_batch, self._ensemble_params)
      yield batch, sums, local_rows(predictions)

  def __call__(self, params, split: str, num_examples: int = -1):
    """Metrics of `params` on the first `num_examples` of `split` (-1: all of it).

    Returns:
      (metrics dict as `metrics.summarize`, sample): sample holds this process's first batch:
      `image`, `tokens`/`label`, `mask` and `prediction` (numpy), for pictures.
    """
    total, sample = None, None
    timed_images, timed_start = 0, None
    for batch, sums, predictions in self._run(params, split, num_examples):
      total = metrics.add_sums(total, jax.device_get(sums))  # Waits for the batch.
      if sample is None:
        sample = {**batch, "prediction": predictions}
        timed_start = time.perf_counter()  # The first batch may compile: time the others.
      else:
        timed_images += self.config.eval_batch_size
    if total is None:
      raise ValueError(f"split {split!r} has no examples")
    summary = metrics.summarize(total)
    if timed_images:
      # Evaluation throughput (greedy decoding for 'read'), padding rows included.
      summary["images_per_second"] = timed_images / (time.perf_counter() - timed_start)
    return summary, sample

  def predictions(self, params, split: str, num_examples: int = -1) -> np.ndarray:
    """This process's predictions of `split` in the split's order, padding rows dropped: the
    raw outputs int32 [n, max_digits + 1] (read) or labels int32 [n] (classify)."""
    rows, order = [], []
    for batch, _, predictions in self._run(params, split, num_examples):
      rows.append(predictions[batch["mask"]])
      if "index" in batch:  # Lines come bucket by bucket: put them back in the split's order.
        order.append(batch["index"][batch["mask"]])
    if not rows:
      raise ValueError(f"split {split!r} has no examples")
    out = np.concatenate(rows)
    return out[np.argsort(np.concatenate(order), kind="stable")] if order else out


def input_module(config):
  """The data module of the task: multi-digit lines or single images."""
  if config.task == "read":
    from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
    return input_pipeline
  if config.task == "classify":
    from digit_vit.data import classification  # pylint: disable=import-outside-toplevel
    return classification
  raise ValueError(f"config.task={config.task!r} is not 'read' or 'classify'")


def main_metric(config) -> str:
  """The validation metric that ranks checkpoints."""
  return "exact_match" if config.task == "read" else "accuracy"


def _check_finite(step: int, step_metrics: dict[str, float], latest_checkpoint):
  if not (math.isfinite(step_metrics["loss"]) and math.isfinite(step_metrics["grad_norm"])):
    raise FloatingPointError(
        f"non-finite training loss {step_metrics['loss']} (gradient norm "
        f"{step_metrics['grad_norm']}) at step {step}; training stopped and this state was not "
        f"checkpointed (latest checkpoint: step {latest_checkpoint}). Lower "
        "config.learning_rate, raise config.warmup_steps or set config.grad_clip_norm.")


def _has_checkpoints(directory: str) -> bool:
  """Whether a checkpoint directory holds a step (intact or not)."""
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _write_config(workdir: str, config) -> None:
  """Writes `workdir/config.json` (creating the workdir) through a temporary file renamed into
  place, so a kill mid-write never leaves a run without a readable config.

  Raises:
    OSError: the workdir cannot be created or written, saying which.
  """
  path = os.path.join(workdir, "config.json")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)
  except OSError as error:
    # The same OSError subclass, with a message that names the workdir once.
    raise type(error)(f"cannot write to --workdir {workdir}: "
                      f"{error.strerror or error}") from error


# ----------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint, then evaluates.

  Writes (process 0 only): TensorBoard summaries, `config.json`, `history.jsonl`, and at the
  end `report.json`, `curves_loss.png`, `curves_accuracy.png`, `curves_epochs.png` and
  `readings.png`;
  checkpoints go to `workdir/checkpoints`.

  Before anything is written: the whole config is checked (`check_config`), and a rerun in a
  workdir that holds checkpoints must keep the saved config but for the fields of
  `config_lib.RESUMABLE_FIELDS` (`config_lib.check_resume`); either raises
  `config_lib.ConfigError` and leaves the workdir as it was. A damaged newest checkpoint is
  moved to `workdir/damaged_checkpoints/` and the run resumes from the newest intact one, with
  a warning (`checkpointing.Checkpoints.restore_newest`).

  Raises:
    config_lib.ConfigError: a bad config, or one the run in `workdir` cannot resume.
    OSError: the workdir cannot be written.
    checkpointing.CorruptCheckpointError: there are checkpoints but none restores.
    FloatingPointError: the training loss became non-finite (training stopped).

  Returns:
    the report: final metrics of every split in `config.eval_splits` prefixed by the split
    (`test_exact_match`, `test_cer`, `test_token_accuracy`, `test_no_eos`,
    `test_wrong_length`, `test_order_errors`, `test_exact_match_length_<n>`,
    `test_read_length_<n>`, `test_loss`, `test_images_per_second`, ... or `test_accuracy`),
    read as `config.decode` says (`decode_beam_size`, `decode_alpha`, `decode_views`; the
    evaluations during training stay greedy on one view),
    `steps`, `train_seconds` (time in training steps, compilation included, evaluation and
    checkpoint writes excluded, summed over resumed runs) and `train_images_per_second` (the
    median rate of the logged intervals of this process after its first), and `environment`
    (`environment.describe()` at the start of this process: commit, packages, CPU).
  """
  workdir = os.path.abspath(workdir)
  # Every check comes before anything is written, so a refused config leaves no workdir (or the
  # run in it untouched).
  check_config(config)
  # How the final report reads (config.decode), checked now rather than after hours of training.
  reading = trained.decoding(config)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  config_lib.check_resume(workdir, config, has_checkpoints=_has_checkpoints(checkpoint_dir))
  is_chief = jax.process_index() == 0
  if is_chief:
    _write_config(workdir, config)
  logging.info("JAX process %d of %d, local devices %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  # Taken at the start: the code may be edited while the run trains.
  ran_on = environment.describe()
  logging.info("Environment: %s", json.dumps(ran_on, sort_keys=True))
  num_steps = int(config.num_train_steps)
  mesh = create_mesh()
  model = build_model(config)
  data = input_module(config)
  learning_rate_fn = create_learning_rate_fn(config)
  state = create_train_state(config, model, create_optimizer(config, learning_rate_fn), mesh)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  best = main_metric(config)
  # Damaged steps are moved aside (with a warning) as long as an intact one remains.
  checkpoints = checkpointing.Checkpoints(
      checkpoint_dir, keep=config.keep_checkpoints, best_metric=f"validation_{best}",
      keep_best=config.get("keep_best_checkpoints", 1), set_aside_damaged=True)

  start_step, train_seconds = 0, 0.0
  try:
    restored = checkpoints.restore_newest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  except BaseException:
    checkpoints.close()  # Else orbax's background threads fail noisily at exit.
    raise
  if restored is not None:
    state, meta, _ = restored
    start_step, train_seconds = int(meta["input_position"]), float(meta["train_seconds"])
    logging.info("Resumed from the checkpoint of step %d in %s.", start_step, workdir)
  if int(state.step) != start_step:
    raise RuntimeError(f"checkpoint step {int(state.step)} != input position {start_step}")

  # clu's writers import TensorFlow (seconds); only a full run needs them, not the step code.
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  history = reporting.History(os.path.join(workdir, "history.jsonl"), enabled=is_chief)
  history.truncate(after_step=start_step)
  stepper = Stepper(config, model, learning_rate_fn, mesh)
  evaluate = Evaluator(config, model, mesh, data)
  logging.info("%s: %d parameters, %d devices, %d process(es), parallelism=%s, steps %d..%d",
               config.task, num_params, jax.device_count(), jax.process_count(),
               config.parallelism, start_step, num_steps)

  progress = tqdm.tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=not (config.progress_bar and is_chief))
  pending: list[tuple[int, dict]] = []  # Metrics of the steps since the last flush.
  rates: list[float] = []  # Training images/s of each flushed interval of this process.
  interval_start = time.perf_counter()

  def flush(step):
    """Brings pending step metrics to the host (one sync), checks them, writes summaries."""
    nonlocal train_seconds
    fetched = jax.device_get([m for _, m in pending])
    elapsed = time.perf_counter() - interval_start
    train_seconds += elapsed
    for (s, _), m in zip(pending, fetched):
      _check_finite(s, m, checkpoints.latest_step())
    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    summary["learning_rate"] = float(fetched[-1]["learning_rate"])
    summary["images_per_second"] = len(pending) * config.batch_size / elapsed
    rates.append(summary["images_per_second"])
    writer.write_scalars(step, {f"train_{k}": v for k, v in summary.items()})
    history.append(step, "train", summary)
    progress.set_postfix(loss=f"{summary['loss']:.4f}",
                         img_s=f"{summary['images_per_second']:.0f}", refresh=False)
    pending.clear()

  train_iter = data.train_iterator(config, seed=config.seed, start_step=start_step,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  try:
    for step in range(start_step + 1, num_steps + 1):
      state, step_metrics = stepper(state, next(train_iter))
      pending.append((step, step_metrics))
      progress.update(1)
      last = step == num_steps
      do_eval = config.eval_every_steps > 0 and (last or step % config.eval_every_steps == 0)
      do_save = last or step % config.checkpoint_every_steps == 0
      if not (do_eval or do_save or step % config.log_every_steps == 0):
        continue
      flush(step)
      if do_eval or do_save:
        state = stepper.to_canonical(state)
      checkpoint_metrics = None
      if do_eval:
        validation, _ = evaluate(state.eval_params(), "validation", config.num_eval_examples)
        writer.write_scalars(step, {f"validation_{k}": v for k, v in validation.items()})
        history.append(step, "validation", validation)
        checkpoint_metrics = {f"validation_{best}": validation[best]}
      if do_save:
        checkpoints.save(step, state, {"input_position": step, "train_seconds": train_seconds},
                         checkpoint_metrics)
      interval_start = time.perf_counter()
  finally:
    progress.close()
    checkpoints.wait()

  report = {"task": config.task, "steps": num_steps, "train_seconds": train_seconds,
            "num_params": num_params, "num_devices": jax.device_count(),
            "num_processes": jax.process_count(), "global_batch_size": config.batch_size}
  if rates:
    # The steady training rate: the median interval, leaving out the first (it compiles).
    report["train_images_per_second"] = float(np.median(rates[1:] if len(rates) > 1 else rates))
  report.update({f"decode_{k}": v for k, v in reading._asdict().items()})
  report["environment"] = ran_on
  read = evaluate
  if reading.beam_size > 1 or reading.views > 1:
    read = Evaluator(config, model, mesh, data, beam_size=reading.beam_size,
                     alpha=reading.alpha, views=reading.views)
  sample = None
  file_reader = None
  for split in config.eval_splits:
    if split in file_evaluation.SPLITS:  # Image files, read as `predict` reads them.
      if file_reader is None:
        # Every process reads the files whole on its own devices, from its copy of the
        # (replicated) parameters.
        params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.eval_params())
        file_reader = predict.Reader.from_params(
            config, params, step=num_steps,
            beam_size=reading.beam_size, alpha=reading.alpha, views=reading.views,
            batch_size=64)
      split_metrics = file_evaluation.evaluate(file_reader, config, split)
      writer.write_scalars(num_steps, {f"final_{split}_{k}": v for k, v in split_metrics.items()})
      report.update({f"{split}_{k}": v for k, v in split_metrics.items()})
      continue
    split_metrics, split_sample = read(state.eval_params(), split)
    writer.write_scalars(num_steps, {f"final_{split}_{k}": v for k, v in split_metrics.items()})
    report.update({f"{split}_{k}": v for k, v in split_metrics.items()})
    sample = split_sample if split == "test" or sample is None else sample
  writer.flush()
  checkpoints.close()
  if is_chief:
    steps_per_epoch = data.num_examples(config, "train") / config.batch_size
    reporting.write_report(workdir, report, history.load(), sample, task=config.task,
                           steps_per_epoch=steps_per_epoch)
  logging.info("Report: %s", json.dumps(report, sort_keys=True))
  return report
