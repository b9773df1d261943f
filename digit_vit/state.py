"""The training state and what makes it: mesh, learning-rate schedule, optimiser, moving average.

`create_train_state` initialises a `TrainState` replicated over a 1-D ('data',) mesh of every
device of every process: the canonical form of the state, which the jit step, evaluation and
checkpoints all take (`steps.Stepper` converts it for pmap).

Moving average. With `config.ema_decay` > 0 the state also keeps an exponential moving average
of the parameters, updated inside the train step (`update_ema`); evaluation, the best
checkpoint's metric and reading (`trained.restore_params`) use it through
`TrainState.eval_params`, and checkpoints hold both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from digit_vit import tasks
from digit_vit.models import tokens

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


def _init_params(config, model, rng: jax.Array):
  """The model's initial float32 parameters, from dummy inputs of one example: an image
  [1, H, W, C] and, for a reader, a target row [1, max_digits + 1] of <sos>."""
  height, width = config.model.image_height, config.model.image_width
  inputs = (jnp.zeros((1, height, width, config.model.image_channels), jnp.float32),)
  if tasks.get(config).reads_lines:  # The decoder's inputs.
    inputs += (jnp.full((1, config.max_digits + 1), tokens.SOS, jnp.int32),)
  return model.init({"params": rng}, *inputs)["params"]


def create_train_state(config, model, tx, mesh) -> TrainState:
  """Initialises parameters (float32), optimiser state and, with `config.ema_decay` > 0, the
  parameters' moving average, replicated over `mesh`."""

  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    params = _init_params(config, model, params_rng)
    ema_params = params if check_ema_decay(config) > 0 else None
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=dropout_rng,
                             ema_params=ema_params)

  replicated = NamedSharding(mesh, P())
  return jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.seed))


def abstract_params(config, model, sharding: jax.sharding.Sharding):
  """The model's parameters as `jax.ShapeDtypeStruct`s on `sharding`, computing nothing: what
  a checkpoint's parameters restore into (`checkpointing.Checkpoints.restore_fields`)."""
  shapes = jax.eval_shape(lambda: _init_params(config, model, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes)
