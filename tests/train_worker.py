"""Runs a few train steps of the tiny config on fixed synthetic batches and saves the result.

A helper of tests/test_train.py, run as a subprocess so each run picks its own device count
(XLA_FLAGS) or joins a multi-process group (jax.distributed on localhost CPU):

  python tests/train_worker.py --out=run.npz --parallelism=jit,pmap
  python tests/train_worker.py --out=run.npz --num_processes=2 --process_id=0 --port=12345

Every process takes its rows of the same global batches, so any device or process layout
should end with the same losses and parameters. With --checkpoint_dir every process also saves
the final state and restores it. Process 0 writes `out`: losses of each
parallelism (`loss_<name>`) and the final parameters (`<name>/<path>`).
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
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--checkpoint_dir", default="")
  args = parser.parse_args()
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)

  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from digit_vit import (  # pylint: disable=import-outside-toplevel
      checkpointing, config_checks, config_lib, state as state_lib, steps)
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
    rows = config.batch_size // jax.process_count()
    losses = []
    for step in range(STEPS):
      batch = synthetic_batch(config, step)
      local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows]
               for k, v in batch.items()}
      state, step_metrics = stepper(state, local)
      losses.append(float(step_metrics["loss"]))
    state = stepper.to_canonical(state)
    if args.checkpoint_dir:  # Every process saves and restores; orbax coordinates them.
      checkpoints = checkpointing.Checkpoints(f"{args.checkpoint_dir}/{parallelism}", keep=1)
      checkpoints.save(STEPS, state, {"input_position": STEPS})
      checkpoints.wait()
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      restored, meta = checkpoints.restore(abstract)
      assert meta == {"input_position": STEPS} and int(restored.step) == STEPS
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.addressable_data(0),
                                                              b.addressable_data(0)),
                   restored, state)
      checkpoints.close()
    results[f"loss_{parallelism}"] = np.asarray(losses)
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    for path, leaf in flat:
      results[f"{parallelism}/{jax.tree_util.keystr(path)}"] = np.asarray(
          leaf.addressable_data(0))
  if jax.process_index() == 0:
    np.savez(args.out, **results)
  print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} "
        f"losses { {k: v.tolist() for k, v in results.items() if k.startswith('loss_')} }")


if __name__ == "__main__":
  main()
