"""The sweeps' base (experiments/sweeps/*.py, full mode): the default recipe at 2,000 steps
instead of 5,000, so that a point with the default architecture trains in about 10 minutes on
the 2-core development CPU and a sweep of 4-5 points in under an hour. Points are compared at
this equal, shorter budget; the default run shows where 5,000 steps take the default model.

  python -m digit_vit.main --config=configs/experiment.py --workdir=runs/experiment
"""

import pathlib

from digit_vit import config_lib


def get_config(arg=None):
  config = config_lib.load(pathlib.Path(__file__).with_name("default.py"), arg)
  # The sweeps' committed points were trained without the CTC head: keeping it off keeps their
  # keys (experiments/sweep.py); a sweep may turn it on as a point.
  config_lib.read_by_the_decoder_alone(config)
  if arg == "quick":  # default.py has shrunk it already.
    return config
  # The lines the sweeps were measured on (experiments/results): 1-8 digits, no elastic digits.
  config.max_digits = 8
  config.data.digit_elastic = 0.0
  config.num_train_steps = 2_000            # 128k lines of 64: about 2 passes over the train split.
  config.data.curriculum_examples = 25_600  # A fifth of the lines, as in the default.
  config.eval_every_steps = 500             # Four validation points for the sweeps' curves.
  config.checkpoint_every_steps = 500       # An interrupted point loses at most 500 steps.
  return config
