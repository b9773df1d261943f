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

  # ---- Model ----
  config.model.patch_size = (4, 4)    # ... gives a 4x12 grid of 48 patches.
  config.model.patch_embedding = "linear"
  config.model.width = 32
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.model.encoder_layers = 1
  config.model.decoder_layers = 1
  return config
