"""Runs `python -m digit_vit.main ARGS` in one process that trains on the global batches that
JOINED_HOSTS processes would train on together: the reference of the multi-process test.

  JOINED_HOSTS=2 python tests/joined_hosts_run.py --config=configs/tiny.py --workdir=...

The input pipeline gives each process its own share of the training lines, shuffled and
distorted by its process index (`input_pipeline.train_iterator`), so the global batches of one
process are not those of two by construction. Here the one process's training batch is host
0's batch, host 1's, ... joined in that order, which is how the trainer lays out the rows of
several processes (`jax.make_array_from_process_local_data`, devices in process order).
Evaluation is left as it is: it reads every line of a split once in any layout, and the
figures are sums over lines (`evaluator.Evaluator`).
"""

import os
import pathlib
import runpy
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# pylint: disable=wrong-import-position
from digit_vit.data import input_pipeline

HOSTS = int(os.environ["JOINED_HOSTS"])
_train_iterator = input_pipeline.train_iterator


def _joined_train_iterator(config, *, seed, start_step=0, process_index=None,
                           process_count=None):
  assert process_count in (None, 1), process_count  # The reference runs as one process.
  hosts = [_train_iterator(config, seed=seed, start_step=start_step, process_index=p,
                           process_count=HOSTS) for p in range(HOSTS)]
  while True:
    parts = [next(host) for host in hosts]
    yield {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


# Patched before digit_vit.main imports anything that could hold on to the original.
input_pipeline.train_iterator = _joined_train_iterator
sys.argv = ["digit_vit.main", *sys.argv[1:]]
runpy.run_module("digit_vit.main", run_name="__main__", alter_sys=True)
