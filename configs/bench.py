"""The benchmark architecture (fixed; PERF_NOTES.md and the speed issue measure it):
32x192 grayscale input, 8x8 patches (96 tokens), d_model 128, 4 heads, MLP 512 with GELU,
4 pre-LN encoder blocks, 2 pre-LN decoder blocks, learned positions, max target length 10
(8 digits), batch 128. 1.35 M parameters.

  python -m digit_vit.bench --config=configs/bench.py
"""

import pathlib

from digit_vit import config_lib


def get_config(arg=None):
  config = config_lib.load(pathlib.Path(__file__).with_name("default.py"), arg)
  # The reference model has no CTC head: compare like with like.
  config_lib.read_by_the_decoder_alone(config)
  config.max_digits = 8               # Target sequences of 10 tokens.
  config.image_height = 32
  config.image_width = 192
  config.width_buckets = (192,)       # One width: the reference model's fixed 32x192 input.
  config.batch_size = 128
  config.model.patch_size = (8, 8)
  config.model.patch_embedding = "linear"
  config.model.width = 128
  config.model.num_heads = 4
  config.model.mlp_dim = 512
  config.model.activation = "gelu"
  config.model.encoder_layers = 4
  config.model.decoder_layers = 2
  config.model.norm = "pre"
  config.model.encoder_position = "learned"
  config.model.decoder_position = "learned"
  config.model.dtype = "float32"
  config.model.max_length = 9         # <sos> + 8 digits, as the reference's decoder.
  config.decode.max_length = 8
  return config
