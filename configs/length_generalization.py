"""Length generalisation: the default reader trained on lines of 1-6 digits only, evaluated on
all lengths 1-8 (the validation and test splits keep every length), so the per-length exact
match (`test_exact_match_length_7`, `_8`) and the digits read (`test_read_length_7`, `_8`) show
what the model does on lines longer than any it has seen.

The model itself still covers 8 digits (max_digits = 8: canvas, decoder positions and
sequences are those of the default); only training stops at 6.

  python -m digit_vit.main --config=configs/length_generalization.py --workdir=runs/lengthgen
  python -m experiments.run experiments/sweeps/length_generalization.py   # with position variants
"""

import pathlib

from digit_vit import config_lib


def get_config(arg=None):
  config = config_lib.load(pathlib.Path(__file__).with_name("default.py"), arg)
  config.data.train_max_digits = 6         # Train on 1-6 digits; evaluate on 1-8.
  return config
