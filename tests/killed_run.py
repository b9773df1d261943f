"""Runs `python -m digit_vit.main ARGS` and kills itself with SIGKILL as soon as the checkpoint
of step KILL_AFTER_STEP is on disk: a run killed mid-way, at a known step, whatever the speed
of the machine (a test that kills a child from outside depends on when it looks).

  KILL_AFTER_STEP=100 python tests/killed_run.py --config=configs/tiny.py --workdir=...
"""

import os
import pathlib
import runpy
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from digit_vit import checkpointing  # pylint: disable=wrong-import-position

KILL_AFTER_STEP = int(os.environ["KILL_AFTER_STEP"])
_save = checkpointing.Checkpoints.save


def _save_then_die(self, step, *args, **kwargs):
  result = _save(self, step, *args, **kwargs)
  if step == KILL_AFTER_STEP:
    self.wait()  # The checkpoint is whole on disk; nothing after it is.
    os.kill(os.getpid(), signal.SIGKILL)
  return result


checkpointing.Checkpoints.save = _save_then_die
sys.argv = ["digit_vit.main", *sys.argv[1:]]
runpy.run_module("digit_vit.main", run_name="__main__", alter_sys=True)
