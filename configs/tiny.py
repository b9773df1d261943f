"""A seconds-fast config for tests: 1-3 digits on a small canvas, a two-block model.

Starts from default.py and shrinks it; use it with any command, e.g.
  python -m digit_vit.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

import pathlib

from digit_vit import config_lib


def get_config(arg=None):
  config = config_lib.load(pathlib.Path(__file__).with_name("default.py"), arg)
  config.max_digits = 3               # Lines of 1-3 digits (sequences of 5 tokens).
  config.image_height = 16            # A 16x48 canvas ...
  config.image_width = 48

  # ---- Data ----
  config.data.train_size = 512        # Builds in about a second.
  config.data.validation_size = 96
  config.data.test_size = 100         # Not a multiple of common batch sizes: exercises padding.
  config.data.curriculum_examples = 0  # Plain epochs: tests see every length from the start.

  # ---- Model ----
  config.model.patch_size = (4, 4)    # ... gives a 4x12 grid of 48 patches.
  config.model.patch_embedding = "linear"
  config.model.width = 32
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.model.encoder_layers = 1
  config.model.decoder_layers = 1

  # ---- Training ----
  config.batch_size = 16              # A step takes milliseconds ...
  config.eval_batch_size = 32
  config.num_train_steps = 30         # ... and a run seconds.
  config.warmup_steps = 5
  config.log_every_steps = 5
  config.eval_every_steps = 15
  config.num_eval_examples = 64
  config.checkpoint_every_steps = 10
  config.progress_bar = False         # Test logs stay readable.
  return config
