"""The digit reader: a ViT encoder over patches and an autoregressive Transformer decoder.

    images [b, H, W, C] --encode--> memory [b, patches, width]
    decoder inputs [b, t] (<sos> d1 .. dn) + memory --decode--> logits [b, t, vocab]
    memory --ctc_head--> ctc logits [b, columns, 11]  (optional: an auxiliary training loss)

In decode mode (`decode=True` on the module) the decoder takes one token per call and keeps
self-attention keys/values and the projected memory in the 'cache' collection, so reading
L tokens costs L single-token decoder steps (see digit_vit/decode.py).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from digit_vit.models import attention, layers, patch, position, tokens
from digit_vit.models.blocks import DecoderBlock, EncoderBlock

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the encoder and decoder (the `model` section of a config file,
  where each field is documented)."""
  image_height: int = 32
  image_width: int = 192
  image_channels: int = 1
  patch_size: tuple[int, int] = (8, 8)
  patch_embedding: str = "linear"
  stem_channels: int = 32
  stem_depth: int = 0
  stem_max_channels: int = 0
  stem_full_res_depth: int = 0
  stem_antialias: bool = False
  width: int = 128
  num_heads: int = 4
  mlp_dim: int = 512
  activation: str = "gelu"
  encoder_layers: int = 4
  decoder_layers: int = 2
  norm: str = "pre"
  encoder_position: str = "learned"
  decoder_position: str = "learned"
  class_token: bool = False
  num_classes: int = 10
  ctc_head: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: str = "custom_vjp"
  dtype: str = "float32"
  max_length: int = 9
  vocab_size: int = tokens.VOCAB_SIZE

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(self.patch_size))
    checks = [
        (self.encoder_position in position.ENCODER_KINDS, "encoder_position",
         position.ENCODER_KINDS),
        (self.decoder_position in position.DECODER_KINDS, "decoder_position",
         position.DECODER_KINDS),
        (self.attention_impl in attention.IMPLEMENTATIONS, "attention_impl",
         attention.IMPLEMENTATIONS),
        (self.patch_embedding in patch.KINDS, "patch_embedding", patch.KINDS),
        (self.norm in ("pre", "post"), "norm", ("pre", "post")),
        (self.dtype in DTYPES, "dtype", tuple(DTYPES)),
    ]
    for ok, name, allowed in checks:
      if not ok:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
    if self.width % self.num_heads:
      raise ValueError(f"model.width={self.width} must be divisible by "
                       f"model.num_heads={self.num_heads}")
    patch.grid_shape((self.image_height, self.image_width), self.patch_size)

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    """From a ConfigDict (or dict); unknown keys are an error naming the known ones."""
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def grid(self) -> tuple[int, int]:
    return patch.grid_shape((self.image_height, self.image_width), self.patch_size)

  @property
  def num_patches(self) -> int:
    rows, cols = self.grid
    return rows * cols

  @property
  def ctc_frames(self) -> int:
    """Frames the CTC head emits: one per column of patches, read left to right."""
    return self.grid[1]


class Encoder(nn.Module):
  """ViT encoder: patch embedding, optional class token, positions, blocks, final norm."""
  config: ModelConfig

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images: [batch, H, W, C] float -> [batch, patches (+1 with class token), width]."""
    cfg = self.config
    dtype = cfg.compute_dtype
    x = patch.PatchEmbedding(cfg.patch_size, cfg.width, cfg.patch_embedding, cfg.stem_channels,
                             cfg.stem_depth, cfg.stem_max_channels, cfg.stem_full_res_depth,
                             cfg.stem_antialias, dtype=dtype,
                             name="patch_embedding")(images)
    grid = cfg.grid
    x = position.AddPositionEncoding(cfg.encoder_position, cfg.num_patches, grid,
                                     name="position")(x)
    positions = None
    if cfg.encoder_position == "rope":
      positions = jnp.asarray(position.grid_positions(*grid))
    if cfg.class_token:
      cls = self.param("class_token", nn.initializers.zeros, (1, 1, cfg.width))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (x.shape[0], 1, 1)), x], axis=1)
      if positions is not None:
        # The class token sits at (-1, -1): before every row and column of the grid.
        positions = jnp.concatenate([jnp.full((1, 2), -1, jnp.int32), positions], axis=0)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    for i in range(cfg.encoder_layers):
      x = EncoderBlock(cfg.num_heads, cfg.mlp_dim, cfg.norm, cfg.activation, cfg.dropout_rate,
                       cfg.attention_dropout_rate, cfg.attention_impl,
                       rope=cfg.encoder_position == "rope", dtype=dtype,
                       name=f"block{i}")(x, positions=positions, deterministic=not train)
    if cfg.norm == "pre":
      x = nn.LayerNorm(dtype=dtype, name="final_norm")(x)
    return x


class Decoder(nn.Module):
  """Autoregressive decoder over digit tokens with cross-attention to the encoder output."""
  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, decoder_inputs, memory, *, train: bool = False,
               return_weights: bool = False):
    """Args:
      decoder_inputs: int32 [batch, t] (t <= max_length; t = 1 per call in decode mode).
      memory: [batch, patches, width].

    Returns:
      logits: float32 [batch, t, vocab]; with `return_weights` also a list, one per block,
      of cross-attention weights [batch, heads, t, patches].
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    x = nn.Embed(cfg.vocab_size, cfg.width, name="token_embedding",
                 embedding_init=nn.initializers.normal(stddev=1.0))(decoder_inputs)
    x = x.astype(dtype)
    x = position.AddPositionEncoding(cfg.decoder_position, cfg.max_length, decode=self.decode,
                                     name="position")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    # In decode mode each attention layer builds its causal mask from its cache index.
    self_mask = None if self.decode else attention.causal_mask(decoder_inputs.shape[1])
    all_weights = []
    for i in range(cfg.decoder_layers):
      out = DecoderBlock(cfg.num_heads, cfg.mlp_dim, cfg.norm, cfg.activation, cfg.dropout_rate,
                         cfg.attention_dropout_rate, cfg.attention_impl,
                         rope=cfg.decoder_position == "rope", decode=self.decode, dtype=dtype,
                         name=f"block{i}")(x, memory, self_mask, deterministic=not train,
                                           return_weights=return_weights)
      if return_weights:
        out, weights = out
        all_weights.append(weights)
      x = out
    if cfg.norm == "pre":
      x = nn.LayerNorm(dtype=dtype, name="final_norm")(x)
    logits = layers.Dense(cfg.vocab_size, dtype=dtype, name="logits")(x).astype(jnp.float32)
    return (logits, all_weights) if return_weights else logits


class CTCHead(nn.Module):
  """Per-column digit logits over the encoder's output, for an auxiliary CTC loss.

  The patches of each column are averaged into one frame, so a line is a left-to-right
  sequence of `grid[1]` frames, each scored over the 10 digits and the CTC blank
  (`tokens.CTC_BLANK`, the last of `tokens.CTC_CLASSES`).
  Training the encoder to emit the digits in order from its own output (joint CTC-attention,
  Kim, Hori and Watanabe 2017) asks each column to say which digit it holds, which the
  decoder's cross-entropy only asks through its attention.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, memory):
    """memory: [batch, patches (+1 with class token), width] -> float32 [batch, columns, 11]."""
    cfg = self.config
    if cfg.class_token:
      memory = memory[:, 1:]
    rows, cols = cfg.grid
    frames = memory.reshape(memory.shape[0], rows, cols, memory.shape[-1]).mean(axis=1)
    logits = layers.Dense(tokens.CTC_CLASSES, dtype=cfg.compute_dtype, name="logits")(frames)
    return logits.astype(jnp.float32)


class DigitReader(nn.Module):
  """Encoder-decoder that reads a line of digits.

  Attributes:
    config: the model hyper-parameters.
    decode: build the decoder in single-token cached mode.
  """
  config: ModelConfig
  decode: bool = False

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config, decode=self.decode)
    if self.config.ctc_head:
      self.ctc_head = CTCHead(self.config)

  def encode(self, images, *, train: bool = False):
    """images: [batch, H, W, C] -> memory [batch, patches, width]."""
    return self.encoder(images, train=train)

  def decode_tokens(self, decoder_inputs, memory, *, train: bool = False,
                    return_weights: bool = False):
    """decoder_inputs: int32 [batch, t], memory -> logits [batch, t, vocab]."""
    return self.decoder(decoder_inputs, memory, train=train, return_weights=return_weights)

  def init_cache(self, memory):
    """Sizes the decode cache for `memory` and projects the memory into cross-attention
    keys/values; call with `mutable=['cache']` on a `decode=True` model and keep the cache."""
    dummy = jnp.full((memory.shape[0], self.config.max_length), tokens.SOS, jnp.int32)
    return self.decoder(dummy, memory)

  def __call__(self, images, decoder_inputs, *, train: bool = False, return_ctc: bool = False):
    """Teacher-forced pass.

    Args:
      images: float [batch, H, W, C].
      decoder_inputs: int32 [batch, t], the target sequence shifted right (starts with <sos>).
      return_ctc: also return the CTC head's logits (needs `config.ctc_head`).

    Returns:
      logits: float32 [batch, t, vocab]; with `return_ctc`, also ctc_logits float32
      [batch, columns, 11] (blank last, `tokens.CTC_BLANK`).
    """
    if return_ctc and not self.config.ctc_head:
      raise ValueError("return_ctc needs a model built with model.ctc_head=True")
    memory = self.encode(images, train=train)
    logits = self.decode_tokens(decoder_inputs, memory, train=train)
    if not (return_ctc or (self.config.ctc_head and self.is_initializing())):
      return logits
    ctc_logits = self.ctc_head(memory)  # Also at `init`, which creates the head's params.
    return (logits, ctc_logits) if return_ctc else logits
