"""A seconds-fast config for tests: 1-3 digits on a small canvas, a two-block model.

Starts from default.py and shrinks it; use it with any command, e.g.
  python -m digit_vit.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

import pathlib

from digit_vit import config_lib


def get_config(arg=None):
  config = config_lib.load(pathlib.Path(__file__).with_name("default.py"), arg)
  # The suite's model reads with its decoder; the tests of the CTC head turn it on.
  config_lib.read_by_the_decoder_alone(config)
  config.max_digits = 3               # Lines of 1-3 digits (sequences of 5 tokens).
  config.image_height = 16            # Lines 16 pixels high, up to 48 wide ...
  config.width_buckets = (24, 48)     # (two buckets: tests see bucketing at work)
  config.image_width = 48
  config.model.max_length = 17        # Reads up to 16 digits: well past the lines' 3.
  config.decode.max_length = 16

  # ---- Data ----
  config.data.train_size = 512        # Builds in about a second.
  config.data.validation_size = 96
  config.data.test_size = 100         # Not a multiple of common batch sizes: exercises padding.
  config.data.curriculum_examples = 0  # Plain epochs: tests see every length from the start.
  # Plain lines (no slant, pens, blur, faint digits, noise or elastic digits), so 60 steps learn
  # something.
  config.data.max_slant = config.data.digit_elastic = 0.0
  config.data.thin_prob = config.data.thicken_prob = config.data.heavy_prob = 0.0
  config.data.blur_prob = config.data.faint_prob = config.data.noise_prob = 0.0

  # ---- Model ----
  config.model.patch_size = (4, 4)    # ... gives a grid of 4 rows and up to 12 columns.
  config.model.patch_embedding = "linear"
  config.model.width = 32
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.model.encoder_layers = 1
  config.model.decoder_layers = 1
  # Fixed positions: tests compare a train step with the same step computed by hand, and drawn
  # positions (tests/test_models.py tests them) would make the two differ.
  config.model.random_positions = False

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
  config.eval_splits = ("validation", "test")  # The file splits take seconds: tests ask for them.
  return config
