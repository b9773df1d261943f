"""ViT classifier with a class token on single MNIST digits (the embedded 5,000; test accuracy
on the held-out rows 400-499 of each class).

  python -m digit_vit.main --config=configs/mnist_vit.py --workdir=runs/mnist_vit
"""

import pathlib

from digit_vit import config_lib


def get_config(arg=None):
  config = config_lib.load(pathlib.Path(__file__).with_name("default.py"), arg)
  config_lib.read_by_the_decoder_alone(config)  # A classifier: no lines, no CTC head.
  config.task = "classify"             # Train ViTClassifier with softmax cross-entropy.
  config.image_height = 28             # MNIST digits are 28x28x1.
  config.image_width = 28
  config.width_buckets = (config.image_width,)  # One size: whole images.
  config.eval_splits = ("validation", "test")  # No line files for a classifier.
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_eval_examples = -1        # Whole validation split: its first rows are sorted by class.
  # Curves per epoch (3,600 training digits / 128 = 28.1 steps): 4 train points and one
  # validation of the 400 validation digits an epoch.
  config.log_every_steps = 7
  config.eval_every_steps = 28

  # ---- Data ----
  config.data.name = "mnist_digits"    # Single MNIST digits from config.data.source.
  config.data.source = "embedded"      # 'embedded' (offline), 'tfds', 'idx'.
  config.data.validation_per_class = 40  # Train digits per class held out for validation.
  config.data.random_crop_padding = 2  # Zero padding before a random crop back to 28x28; 0 = off.
  config.data.horizontal_flip = False  # Digits must not be mirrored.
  config.data.mean = (0.1307,)         # Per-channel normalisation (MNIST statistics); () = none.
  config.data.std = (0.3081,)

  # ---- Model ----
  config.model.patch_size = (7, 7)     # 4x4 grid of 16 patches, as the seeds' 16 tokens.
  config.model.patch_embedding = "linear"
  config.model.class_token = True      # Classify from the class token's output.
  config.model.num_classes = 10
  config.model.width = 64              # The seeds' width 64.
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.encoder_layers = 4
  config.model.encoder_position = "learned"
  config.model.dropout_rate = 0.1
  return config
