"""The reader's encoder as a classifier of single digits: a probe of per-digit accuracy.

A line is read exactly only when every digit on it is, so the reader's exact match on lines of
1-8 digits (4.5 on average) is about p ** 4.5 for a per-digit accuracy p: 95% needs p near
98.9%. The probe measures p in a few minutes instead of a line run's hours: the default
reader's encoder (full-height 32x8 strips from the conv stem, width 128, 4 blocks), with a
class token, trained on the embedded train digits (rows 0-359 of each class) padded to 32x32
(4 strips), with the long run's distortions, and tested on the held-out rows 400-499. Compare
stems, widths and augmentations here before a line run, e.g.

  python -m digit_vit.main --config=configs/digit_probe.py --workdir=runs/probe
  python -m digit_vit.main --config=configs/digit_probe.py --workdir=runs/probe_deep \
      --config.model.stem_depth=1
"""

import pathlib

from digit_vit import config_lib


def get_config(arg=None):
  config = config_lib.load(pathlib.Path(__file__).with_name("mnist_vit.py"), arg)
  config.image_height = 32             # 28x28 digits with 2 zero pixels a side.
  config.image_width = 32
  config.width_buckets = (config.image_width,)  # One size: whole images.
  config.eval_splits = ("validation", "test")  # No line files for a classifier.
  config.num_train_steps = 1_125       # 40 epochs of the 3,600 train digits in batches of 128.
  config.warmup_steps = 100
  config.log_every_steps = 25
  config.eval_every_steps = 225        # Validation (400 digits) every 8 epochs.
  config.checkpoint_every_steps = 1_125

  # ---- Data: the pixels the reader sees (ink 1 on 0), distorted as in configs/long.py ----
  config.data.canvas_padding = 2       # Zero pixels added on each side of every digit.
  config.data.random_crop_padding = 0  # The affine distortion shifts the digit instead.
  config.data.mean = ()                # No normalisation: the reader's input is [0, 1].
  config.data.std = ()
  config.data.augment.affine_prob = 0.5
  config.data.augment.elastic_prob = 0.3

  # ---- Model: the default reader's encoder ----
  config.model.patch_size = (32, 8)    # Full-height strips, 4 of them.
  config.model.patch_embedding = "conv"
  config.model.stem_channels = 16
  config.model.width = 128
  config.model.num_heads = 4
  config.model.mlp_dim = 512
  config.model.encoder_layers = 4
  config.model.dropout_rate = 0.1      # As in configs/long.py.

  if arg == "quick":                   # A smoke run: one block, 60 steps.
    config.model.encoder_layers = 1
    config.num_train_steps = 60
    config.warmup_steps = 10
    config.eval_every_steps = 30
    config.checkpoint_every_steps = 60
  return config
