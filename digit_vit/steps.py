"""The loss and the compiled steps: `loss_fn`, `train_step`, `eval_step` and `Stepper`.

One loss function (`loss_fn`, sums of a masked weighted cross-entropy) serves both tasks:

- 'read': the DigitReader, teacher-forced on the target sequence shifted right; evaluated
  (`eval_step`) by free-running decoding against the targets plus the teacher-forced loss;
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
update.

Randomness: dropout at step t uses fold_in(state.rng, t) (and the device index under pmap), so
a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from digit_vit import decode, losses, metrics, state as state_lib, tasks, trained, xla_options
from digit_vit.models import ModelConfig, ViTClassifier, tokens
from digit_vit.models.reader import ctc_frame_mask

PARALLELISM = ("jit", "pmap")


def check_ctc_weight(config) -> float:
  """config.loss.ctc_weight (0 = no CTC loss), checked against the task and model."""
  weight = float(config.loss.get("ctc_weight", 0.0) or 0.0)
  if weight < 0:
    raise ValueError(f"config.loss.ctc_weight={weight} must be >= 0 (0 = no CTC loss)")
  if weight == 0:
    return 0.0
  if not tasks.get(config).reads_lines or not config.model.get("ctc_head", False):
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


# ----------------------------------------------------------------------------------------------
# The loss


def _logits_and_targets(config, model, params, batch, *, train: bool, dropout_rng=None,
                        return_ctc: bool = False):
  """Teacher-forced logits and their targets: read -> [b, L-1, vocab] and [b, L-1];
  classify -> [b, classes] and [b]. With `return_ctc` (read only) the CTC head's logits
  [b, columns, 11] come third."""
  rngs = {"dropout": dropout_rng} if train else None
  task = tasks.get(config)
  if task.reads_lines:
    decoder_inputs, targets = tokens.split_decoder_io(batch[task.target])
    outputs = model.apply({"params": params}, batch["image"], decoder_inputs,
                          widths=batch.get("width"), train=train, rngs=rngs,
                          return_ctc=return_ctc)
    return (outputs[0], targets, outputs[1]) if return_ctc else (outputs, targets)
  return (model.apply({"params": params}, batch["image"], train=train, rngs=rngs),
          batch[task.target])


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
    with the CTC loss on, `ctc` and `lines` (its sum, and the lines it is summed over); all
    float32 scalars.
  """
  ctc_weight = check_ctc_weight(config) if train else 0.0
  logits, targets, *ctc_logits = _logits_and_targets(
      config, model, params, batch, train=train, dropout_rng=dropout_rng,
      return_ctc=ctc_weight > 0)
  # <pad> and class weights are token notions; a classifier's labels are all counted.
  is_read = tasks.get(config).reads_lines
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


# ----------------------------------------------------------------------------------------------
# Steps


def train_step(state: state_lib.TrainState, batch, *, config, model, learning_rate_fn,
               axis_name: str | None = None):
  """One optimiser step on `batch` (as `loss_fn` takes it).

  Under jit the batch is the global one; under pmap (`axis_name` set) it is one device's
  part, and sums and gradients are added over `axis_name` before dividing once by the global
  weight, so both give the same update.

  Returns:
    (new state, metrics: loss, accuracy, grad_norm, learning_rate and, with the CTC loss on,
    ctc_loss, as float32 scalars).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
  grad_fn = jax.grad(functools.partial(
      loss_fn, config=config, model=model, train=True, dropout_rng=dropout_rng,
      label_smoothing=config.loss.label_smoothing), has_aux=True)
  grads, sums = grad_fn(state.params, batch)
  if axis_name is not None:
    grads, sums = jax.lax.psum((grads, sums), axis_name)
  # Gradients of the mean loss over the global batch.
  weight = jnp.maximum(sums["weight"], 1e-9)
  grads = jax.tree.map(lambda g: g / weight, grads)
  new_state = state.apply_gradients(grads=grads)
  if state.ema_params is not None:
    new_state = new_state.replace(ema_params=state_lib.update_ema(
        state.ema_params, new_state.params, state_lib.check_ema_decay(config), state.step))
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
    batch: as `loss_fn` takes it, with its `mask` bool [b].
    beam_size, alpha, views: how a reader decodes (`decode.decode`; a classifier takes views
      only); training evaluates greedily on the images alone, with the decoder, the CTC
      head or both as `config.decode.reader` says (`trained.reader_options`).
    ensemble_params, ensemble_configs: further models (their params and `ModelConfig`s) that
      read together with `params`: each token (`decode.greedy_decode`) or label picked by the
      mean probability over all of them; the (teacher-forced) loss stays that of `params` alone.

  Returns:
    (sums, predictions, extras): sums as in `metrics` plus the teacher-forced `loss` and
    `weight`; predictions are the raw free-running outputs int32 [b, max_digits + 1] (read) or
    the predicted labels int32 [b] (classify); extras (read) {'step_log_probs': float32
    [b, max_digits + 1, vocab]}, the distributions each token was picked from, for
    calibrating the line confidence without decoding again (`calibration.Lines`); {} for
    classify.
  """
  _, sums = loss_fn(params, batch, config=config, model=model, train=False)
  loss_sums = {"loss": sums["loss"], "weight": sums["weight"]}
  if tasks.get(config).reads_lines:
    # A lone model is an ensemble of one to `decode`.
    # A line of the split has at most max_digits digits: a reading that has not stopped by
    # then is wrong already, so decoding further only costs time.
    outputs, _, step_log_probs = decode.decode(
        (model.config, *ensemble_configs), (params, *ensemble_params), batch["image"],
        widths=batch.get("width"), beam_size=beam_size, alpha=alpha, views=views,
        max_length=min(config.max_digits + 2, model.config.max_length), step_log_probs=True,
        **trained.reader_options(config))
    _, targets = tokens.split_decoder_io(batch["tokens"])
    return ({**metrics.reading_sums(outputs, targets, batch["mask"],
                                    max_digits=config.max_digits), **loss_sums}, outputs,
            {"step_log_probs": step_log_probs})
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
  return ({**metrics.classification_sums(logits, batch["label"], batch["mask"]),
           **loss_sums}, predictions, {})


# ----------------------------------------------------------------------------------------------
# The compiled train step


class Stepper:
  """The compiled train step in the configured parallel style, on host-local numpy batches:
  `stepper(state, batch) -> (state, metrics)`, a function of its arguments alone.

  A state has two forms. The canonical one (replicated global arrays, as
  `state.create_train_state` makes it) is what evaluation and checkpoints take, and the jit
  step's own. The pmap step keeps one copy per local device instead (every leaf [local
  devices, ...]): it takes either form and returns that one, so that steps follow each other
  without a copy; `to_canonical` turns it back. Under jit the two forms are the same and
  `to_canonical` returns its argument.
  """

  def __init__(self, config, model, learning_rate_fn, mesh):
    self.parallelism = config.parallelism
    self.replicated = NamedSharding(mesh, P())
    self.data_sharding = NamedSharding(mesh, P("data"))
    step = functools.partial(train_step, config=config, model=model,
                             learning_rate_fn=learning_rate_fn)
    if self.parallelism == "jit":
      self._step = xla_options.jit(step, matmul_dtype=xla_options.matmul_dtype_of(config),
                                   in_shardings=(self.replicated, self.data_sharding),
                                   out_shardings=(self.replicated, self.replicated),
                                   donate_argnums=0)
    else:
      self._step = jax.pmap(functools.partial(step, axis_name="batch"), axis_name="batch",
                            donate_argnums=0)

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
    """One train step (`train_step`); the state passed in is donated.

    Args:
      state: a `TrainState`, canonical or (pmap) in per-device form.
      batch: this process's rows of the global batch, numpy (as `loss_fn` takes it, [b / p,
        ...] for p processes).

    Returns:
      (the new state: canonical under jit, per-device under pmap; the step's metrics as
      device scalars, not synchronised, so that steps queue up).
    """
    if self.parallelism == "jit":
      return self._step(state, self.global_batch(batch))
    n = jax.local_device_count()
    local = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    state, step_metrics = self._step(self._per_device(state), local)
    return state, jax.tree.map(_first_replica, step_metrics)

  def _per_device(self, state):
    """A canonical state as pmap's per-device copies (a per-device one as it is)."""
    if np.ndim(state.step) > 0:  # The step counter is a scalar in the canonical form only.
      return state
    n = jax.local_device_count()
    return jax.tree.map(
        lambda x: np.broadcast_to(np.asarray(x.addressable_data(0)), (n,) + x.shape), state)

  def to_canonical(self, state):
    """The state as replicated global arrays (a canonical one as it is)."""
    if self.parallelism == "jit" or np.ndim(state.step) == 0:
      return state
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self.replicated, np.asarray(_first_replica(x))), state)


def _first_replica(x: jax.Array) -> jax.Array:
  """Device 0's copy of a pmap output [devices, ...] -> [...], without gathering the others.

  Its shard keeps the device axis (of size 1) where pmap is built on shard_map (JAX >= 0.8)
  and drops it under the older PmapSharding."""
  data = x.addressable_shards[0].data
  return data[0] if data.ndim == x.ndim else data
