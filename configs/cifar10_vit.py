"""ViT classifier with a class token on CIFAR-10, with the seeds' coursework augmentations
(random crop with padding 4, horizontal flip, per-channel normalisation). Needs TFDS cifar10:
a network, or a data_dir where it was prepared.

  python -m digit_vit.main --config=configs/cifar10_vit.py --workdir=runs/cifar10_vit
"""

import pathlib

from digit_vit import config_lib


def get_config(arg=None):
  config = config_lib.load(pathlib.Path(__file__).with_name("default.py"), arg)
  config_lib.read_by_the_decoder_alone(config)  # A classifier: no lines, no CTC head.
  config.task = "classify"             # Train ViTClassifier with softmax cross-entropy.
  config.image_height = 32             # CIFAR-10 images are 32x32x3.
  config.image_width = 32
  config.width_buckets = (config.image_width,)  # One size: whole images.
  config.eval_splits = ("validation", "test")  # No line files for a classifier.
  config.batch_size = 192              # The seeds' batch size.
  config.eval_batch_size = 500
  config.num_eval_examples = -1        # Periodic validation on the whole split (5,000 images).
  config.eval_every_steps = 234        # About an epoch (45,000 / 192): a validation an epoch.

  # ---- Data ----
  config.data.name = "cifar10"         # TFDS cifar10 (needs network or a prepared data_dir).
  config.data.data_dir = ""            # TFDS data dir holding cifar10; '' = TFDS default.
  config.data.validation_size = 5000   # Last images of the TFDS train split held out.
  config.data.random_crop_padding = 4  # The seeds' RandomCrop(32, padding=4).
  config.data.horizontal_flip = True   # The seeds' RandomHorizontalFlip().
  config.data.mean = (0.4914, 0.4822, 0.4465)  # The seeds' Normalize(mean, std).
  config.data.std = (0.2023, 0.1994, 0.2010)

  # ---- Model ----
  config.model.image_channels = 3
  config.model.patch_size = (4, 4)     # 8x8 grid: 64 patches + the class token = 65 tokens.
  config.model.patch_embedding = "linear"
  config.model.class_token = True
  config.model.num_classes = 10
  config.model.width = 256             # The seeds' coursework: [192, 65, 256] encoder states.
  config.model.num_heads = 8
  config.model.mlp_dim = 512
  config.model.encoder_layers = 6
  config.model.encoder_position = "learned"
  config.model.dropout_rate = 0.1
  return config
