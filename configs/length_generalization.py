"""Length generalisation: the default reader trained on lines of 1-6 digits only, evaluated on
all lengths 1-12 (the validation and test splits keep every length), so the per-length exact
match (`test_exact_match_length_7` .. `_12`), CER and the digits read (`test_read_length_n`)
show what the model does on lines longer than any it has seen.

Only training stops at 6: the dataset has lines of 1-12 digits (max_digits = 12) at their
natural width in the default's width buckets, `data.train_max_digits = 6` keeps the longer
lines out of the training lines alone, and the model is the default's, whose decoder reads up
to decode.max_length = 32 digits (model.max_length = 33 positions, <sos> included; with
randomized positions, training on 1-6 digits trains all of them). Evaluation during training
decodes up to max_digits + 1 digits; the `long` split (9-16 digits) is read as far as
decode.max_length. The default's 3,000 steps are of lines of 1-16 digits; on 1-6 digits a step
sees less than half the digits, so this trains 5,000 as the 8-digit recipe did.

  python -m digit_vit.main --config=configs/length_generalization.py --workdir=runs/lengthgen
  python -m experiments.run experiments/sweeps/length_generalization.py   # with position variants
"""

import pathlib

from digit_vit import config_lib


def get_config(arg=None):
  config = config_lib.load(pathlib.Path(__file__).with_name("default.py"), arg)
  # The committed sweep's base point is the decoder alone; its CTC point turns the head on.
  config_lib.read_by_the_decoder_alone(config)
  config.max_digits = 12                   # The test lines: 1-12 digits.
  config.data.train_max_digits = 6         # Train on 1-6 digits; evaluate on 1-12.
  if arg != "quick":  # default.py has shrunk a quick run already.
    config.num_train_steps = 5_000
  return config
