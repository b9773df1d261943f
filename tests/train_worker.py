"""Runs a few train steps of the tiny config on fixed synthetic batches and saves the result.

A helper of tests/test_train.py, run as a subprocess so each run picks its own device count
(XLA_FLAGS):

  python tests/train_worker.py --out=run.npz --parallelism=jit,pmap

The global batches are the same whatever the devices, so any device layout should end with the
same losses and parameters. It writes `out`: losses of each parallelism (`loss_<name>`) and the
final parameters (`<name>/<path>`). (Several processes: test_train.py runs `digit_vit.main`.)
"""

import argparse
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

STEPS = 3


def synthetic_batch(config, step: int) -> dict[str, np.ndarray]:
  """The global batch of `step`: random images and random 1..max_digits digit strings."""
  from digit_vit.models import tokens  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(step)
  b = config.batch_size
  digits = ["".join(map(str, rng.integers(0, 10, rng.integers(1, config.max_digits + 1))))
            for _ in range(b)]
  return {"image": rng.uniform(size=(b, config.image_height, config.image_width, 1)
                               ).astype(np.float32),
          "tokens": tokens.encode_batch(digits, config.max_digits)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--parallelism", default="jit")
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args()

  from digit_vit import (  # pylint: disable=import-outside-toplevel
      config_checks, config_lib, state as state_lib, steps)
  from digit_vit.models import build_model  # pylint: disable=import-outside-toplevel

  config = config_lib.load("tiny")
  config.batch_size = args.batch_size
  config.eval_batch_size = args.batch_size
  # SGD keeps the comparison tight: Adam divides by sqrt(v), which magnifies float round-off
  # (from summing in another order) in gradients that are nearly 0, such as attention key
  # biases, to the size of a learning-rate step.
  config.optimizer = "sgd"
  config.learning_rate = 0.5
  config.warmup_steps = 0
  config_checks.check_config(config)
  results = {}
  for parallelism in args.parallelism.split(","):
    config.parallelism = parallelism
    mesh = state_lib.create_mesh()
    model = build_model(config)
    lr_fn = state_lib.create_learning_rate_fn(config)
    state = state_lib.create_train_state(config, model, state_lib.create_optimizer(config, lr_fn),
                                         mesh)
    stepper = steps.Stepper(config, model, lr_fn, mesh)
    losses = []
    for step in range(STEPS):
      state, step_metrics = stepper(state, synthetic_batch(config, step))
      losses.append(float(step_metrics["loss"]))
    state = stepper.to_canonical(state)
    results[f"loss_{parallelism}"] = np.asarray(losses)
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    for path, leaf in flat:
      results[f"{parallelism}/{jax.tree_util.keystr(path)}"] = np.asarray(
          leaf.addressable_data(0))
  np.savez(args.out, **results)
  print(f"devices {jax.device_count()} "
        f"losses { {k: v.tolist() for k, v in results.items() if k.startswith('loss_')} }")


if __name__ == "__main__":
  main()
