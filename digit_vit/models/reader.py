"""The digit reader: a ViT encoder over patches and an autoregressive Transformer decoder.

    images [b, H, W, C] (+ widths [b]) --encode--> memory [b, patches, width]
    decoder inputs [b, t] (<sos> d1 .. dn) + memory (+ memory mask) --decode--> logits [b, t, vocab]
    memory --ctc_head--> ctc logits [b, columns, 11]  (optional: an auxiliary training loss)

Images have the config's height and any width W that is a multiple of the patch width, up to
`image_width` (the widest bucket); a batch is padded on the right with zeros (background) to its
bucket's width, and `widths` int32 [b] gives each image's valid width in pixels. The patches of
columns that start past it are padding: `patch_mask` flags them, the encoder's self-attention
and the decoder's cross-attention never attend to them, and `ctc_frame_mask` flags the CTC
head's padded frames. The valid patches, the decoder's logits and the valid CTC frames are then
the same as for the unpadded image (up to float rounding). widths=None: every column is valid,
and no mask is built at all.

In decode mode (`decode=True` on the module) the decoder takes one token per call and keeps
self-attention keys/values, the projected memory and the memory's mask in the 'cache'
collection, so reading L tokens costs L single-token decoder steps (see digit_vit/decode.py).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from digit_vit.models import attention, layers, patch, position, tokens
from digit_vit.models.blocks import DecoderBlock, EncoderBlock

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Position kinds that randomized positions can draw for ('none' has no positions to draw).
RANDOM_DECODER_KINDS = ("learned", "sinusoidal", "rope")
RANDOM_ENCODER_KINDS = ("learned", "learned_2d", "sinusoidal", "sinusoidal_2d", "rope")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the encoder and decoder (the `model` section of a config file,
  where each field is documented).

  The fields about widths and positions:

  Attributes:
    image_height: the height of every image, in pixels.
    image_width: the widest image the encoder reads (the widest width bucket): it sizes the
      learned position tables of the patch grid (`grid`); narrower images, any multiple of the
      patch width, use those tables' leading columns (`grid_for`).
    encoder_position: 'learned' (a table over the widest grid in raster order, indexed by
      (row, column) so a patch gets the same entry in any width), 'learned_2d' (row table +
      column table), 'sinusoidal' (the fixed 1-D table, indexed as 'learned'),
      'sinusoidal_2d' (half the channels for the row, half for the column), 'rope' (2-D
      rotary on (row, column) inside self-attention; defined for any width) or 'none'.
    decoder_position: 'learned' (a table of `max_length` entries), 'sinusoidal', 'rope' (any
      length) or 'none'.
    max_length: decoder positions: <sos> + the most digits ever read, so the learned table
      and the decode cache have this many entries and `decode` writes at most this many
      tokens (<eos> included). It may exceed the training lines' max_digits + 1: entries past
      those are only trained with `random_positions`.
    random_positions: randomized decoder positions (Ruoss et al., ACL 2023). In training
      (`train=True`, with an rng 'positions' or else 'dropout') each sequence of t tokens is
      given a sorted random sample of t distinct positions of range(max_length) instead of
      0..t-1, so every entry of the table (or every rotation, for RoPE) is trained although
      training lines are short, and positions past the training lengths mean what they meant
      in training: their order. In evaluation and decode mode positions are 0..t-1. For
      'learned', 'sinusoidal' and 'rope'.
    random_encoder_positions: the same for the encoder's columns: in training the t columns
      of the patch grid get a sorted random sample of t column indices of the widest grid
      (rows keep theirs), so columns past the training images' widths are trained. For every
      encoder_position but 'none'.
  """
  image_height: int = 32
  image_width: int = 192
  image_channels: int = 1
  patch_size: tuple[int, int] = (8, 8)
  patch_embedding: str = "linear"
  stem_channels: int = 32
  stem_depth: int = 0
  stem_max_channels: int = 0
  width: int = 128
  num_heads: int = 4
  mlp_dim: int = 512
  activation: str = "gelu"
  encoder_layers: int = 4
  decoder_layers: int = 2
  norm: str = "pre"
  encoder_position: str = "learned"
  decoder_position: str = "learned"
  random_positions: bool = False
  random_encoder_positions: bool = False
  class_token: bool = False
  num_classes: int = 10
  ctc_head: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: str = "custom_vjp"
  dtype: str = "float32"
  matmul_dtype: str = "float32"
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
        (self.matmul_dtype in DTYPES, "matmul_dtype", tuple(DTYPES)),
    ]
    for ok, name, allowed in checks:
      if not ok:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
    if self.width % self.num_heads:
      raise ValueError(f"model.width={self.width} must be divisible by "
                       f"model.num_heads={self.num_heads}")
    # Silently ignored, a sweep over them would measure nothing.
    if self.random_positions and self.decoder_position not in RANDOM_DECODER_KINDS:
      raise ValueError(f"model.random_positions=True needs a decoder_position in "
                       f"{RANDOM_DECODER_KINDS}, got {self.decoder_position!r}")
    if self.random_encoder_positions and self.encoder_position not in RANDOM_ENCODER_KINDS:
      raise ValueError(f"model.random_encoder_positions=True needs an encoder_position in "
                       f"{RANDOM_ENCODER_KINDS}, got {self.encoder_position!r}")
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
  def operand_dtype(self):
    """The dense layers' operand dtype (`layers.Dense.operand_dtype`): `matmul_dtype`
    rounds their products' operands, which accumulate in the compute dtype."""
    return DTYPES[self.matmul_dtype]

  @property
  def grid(self) -> tuple[int, int]:
    """(rows, cols) of patches at the widest width, `image_width`."""
    return patch.grid_shape((self.image_height, self.image_width), self.patch_size)

  def grid_for(self, width: int) -> tuple[int, int]:
    """(rows, cols) of patches of an image `width` pixels wide.

    Raises:
      ValueError: unless 0 < width <= image_width and width is a multiple of the patch width
        (which is also the conv stem's total column stride).
    """
    patch_width = self.patch_size[1]
    if not 0 < width <= self.image_width or width % patch_width:
      raise ValueError(
          f"image width {width} must be a multiple of the patch width {patch_width} (and of "
          f"the conv stem's stride) between {patch_width} and model.image_width="
          f"{self.image_width} (the widest bucket); pad the batch to a configured bucket")
    return patch.grid_shape((self.image_height, width), self.patch_size)

  @property
  def num_patches(self) -> int:
    rows, cols = self.grid
    return rows * cols

  @property
  def ctc_frames(self) -> int:
    """Frames the CTC head emits at the widest width: one per column of patches, read left to
    right (`grid_for(width)[1]` for a narrower batch)."""
    return self.grid[1]


def _column_valid(config: ModelConfig, widths, width: int):
  """bool [batch, cols]: column c of an image `width` wide is valid iff it starts inside the
  valid width, c * patch_width < widths: a column the valid width only partly covers still
  holds ink."""
  _, cols = config.grid_for(width)
  starts = jnp.arange(cols, dtype=jnp.int32) * config.patch_size[1]
  return starts[None, :] < jnp.asarray(widths, jnp.int32)[:, None]


def patch_mask(config: ModelConfig, widths, width: int):
  """Which encoder outputs hold the image rather than its bucket padding.

  Args:
    config: the model config.
    widths: int [batch] valid width of each image in pixels (<= width).
    width: the batch's (bucket's) width in pixels.

  Returns:
    bool [batch, patches (+1 with class token, first and always True)], in the encoder's
    raster order: True on the patches of columns c with c * patch_width < widths.
  """
  rows, _ = config.grid_for(width)
  valid = jnp.tile(_column_valid(config, widths, width), (1, rows))
  if config.class_token:
    valid = jnp.concatenate([jnp.ones((valid.shape[0], 1), jnp.bool_), valid], axis=1)
  return valid


def ctc_frame_mask(config: ModelConfig, widths, width: int):
  """bool [batch, columns]: which frames of the CTC head hold the image (columns c with
  c * patch_width < widths); `~mask` is optax.ctc_loss's logit paddings."""
  return _column_valid(config, widths, width)


class Encoder(nn.Module):
  """ViT encoder: patch embedding, optional class token, positions, blocks, final norm."""
  config: ModelConfig

  @nn.compact
  def __call__(self, images, *, widths=None, train: bool = False):
    """Args:
      images: float [batch, H, W, C], H = image_height, W a multiple of the patch width up to
        image_width, padded on the right with zeros past `widths`.
      widths: int [batch] valid width of each image in pixels, or None (all valid).
      train: dropout and randomized encoder positions.

    Returns:
      memory [batch, patches (+1 with class token), width]; the outputs of padded patches
      (`patch_mask` False) are not defined.
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    _, height, width, _ = images.shape
    if height != cfg.image_height:
      raise ValueError(f"images are {height} pixels high but model.image_height="
                       f"{cfg.image_height}")
    rows, cols = cfg.grid_for(width)
    x = patch.PatchEmbedding(cfg.patch_size, cfg.width, cfg.patch_embedding, cfg.stem_channels,
                             cfg.stem_depth, cfg.stem_max_channels, dtype=dtype,
                             name="patch_embedding")(images, widths)
    batch = x.shape[0]
    col_index = None  # Each column's index into the widest grid's columns: None = its own.
    if cfg.random_encoder_positions and train:
      col_index = position.random_sorted_positions(position.positions_rng(self), batch,
                                                   cols, cfg.grid[1])
    # What each column is indexed by, for tests and analysis (free unless 'intermediates' is
    # mutable): int32 [cols] or, randomized, [batch, cols].
    self.sow("intermediates", "column_positions",
             jnp.arange(cols, dtype=jnp.int32) if col_index is None else col_index)
    grid_positions = self._grid_positions(rows, cols, col_index)  # None: the whole grid.
    additive = None
    if grid_positions is not None and cfg.encoder_position in ("learned", "sinusoidal"):
      # 1-D tables run over the widest grid in raster order: (row, col) is its entry
      # row * widest_cols + col, the entry the same patch has in the widest image.
      additive = grid_positions[..., 0] * cfg.grid[1] + grid_positions[..., 1]
    elif cfg.encoder_position in ("learned_2d", "sinusoidal_2d"):
      additive = grid_positions
    x = position.AddPositionEncoding(cfg.encoder_position, cfg.num_patches, cfg.grid,
                                     name="position")(x, additive)
    rope_positions = None
    if cfg.encoder_position == "rope":
      rope_positions = (jnp.asarray(position.grid_positions(rows, cols))
                        if grid_positions is None else grid_positions)
    if cfg.class_token:
      cls = self.param("class_token", nn.initializers.zeros, (1, 1, cfg.width))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (x.shape[0], 1, 1)), x], axis=1)
      if rope_positions is not None:
        # The class token sits at (-1, -1): before every row and column of the grid.
        corner = jnp.full(rope_positions.shape[:-2] + (1, 2), -1, jnp.int32)
        rope_positions = jnp.concatenate([corner, rope_positions], axis=-2)
    mask = None
    if widths is not None:  # Padded patches are never attended to (as keys).
      mask = attention.padding_mask(None, patch_mask(cfg, widths, width))
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    for i in range(cfg.encoder_layers):
      x = EncoderBlock(cfg.num_heads, cfg.mlp_dim, cfg.norm, cfg.activation, cfg.dropout_rate,
                       cfg.attention_dropout_rate, cfg.attention_impl,
                       rope=cfg.encoder_position == "rope", dtype=dtype,
                       matmul_dtype=cfg.operand_dtype, name=f"block{i}")(x, mask, positions=rope_positions,
                                         deterministic=not train)
    if cfg.norm == "pre":
      x = nn.LayerNorm(dtype=dtype, name="final_norm")(x)
    return x

  def _grid_positions(self, rows, cols, col_index):
    """(row, column) in the widest grid of each patch, int32 [patches, 2] or, with per-example
    random columns `col_index` [batch, cols], [batch, patches, 2]; None when the grid is the
    widest one in its own order (the tables then apply whole, as before widths existed)."""
    if col_index is None:
      if cols == self.config.grid[1]:
        return None
      return jnp.asarray(position.grid_positions(rows, cols))
    row_of = jnp.asarray(np.repeat(np.arange(rows, dtype=np.int32), cols))        # [patches]
    col_of = jnp.tile(col_index, (1, rows))                                       # [b, patches]
    return jnp.stack([jnp.broadcast_to(row_of, col_of.shape), col_of], axis=-1)


class Decoder(nn.Module):
  """Autoregressive decoder over digit tokens with cross-attention to the encoder output."""
  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, decoder_inputs, memory, *, memory_mask=None, train: bool = False,
               return_weights: bool = False):
    """Args:
      decoder_inputs: int32 [batch, t] (t <= max_length; t = 1 per call in decode mode).
      memory: [batch, patches, width].
      memory_mask: bool [batch, patches] (`patch_mask`): the patches cross-attention may look
        at; None = all. In decode mode the mask given to the call that sizes the cache
        (`DigitReader.init_cache`) is kept in the cache and used by every step.
      train: dropout and randomized positions.

    Returns:
      logits: float32 [batch, t, vocab]; with `return_weights` also a list, one per block,
      of cross-attention weights [batch, heads, t, patches].
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    batch, length = decoder_inputs.shape
    x = nn.Embed(cfg.vocab_size, cfg.width, name="token_embedding",
                 embedding_init=nn.initializers.normal(stddev=1.0))(decoder_inputs)
    x = x.astype(dtype)
    positions = None  # 0..t-1 (or the cache index in decode mode).
    if cfg.random_positions and train and not self.decode:
      positions = position.random_sorted_positions(position.positions_rng(self), batch, length,
                                                   cfg.max_length)
    if not self.decode:  # As the encoder's column positions: [t] or, randomized, [batch, t].
      self.sow("intermediates", "positions",
               jnp.arange(length, dtype=jnp.int32) if positions is None else positions)
    x = position.AddPositionEncoding(cfg.decoder_position, cfg.max_length, decode=self.decode,
                                     name="position")(x, positions)
    rope_positions = positions if cfg.decoder_position == "rope" else None
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    # In decode mode each attention layer builds its causal mask from its cache index.
    self_mask = None if self.decode else attention.causal_mask(length)
    cross_mask = None if memory_mask is None else attention.padding_mask(None, memory_mask)
    all_weights = []
    for i in range(cfg.decoder_layers):
      out = DecoderBlock(cfg.num_heads, cfg.mlp_dim, cfg.norm, cfg.activation, cfg.dropout_rate,
                         cfg.attention_dropout_rate, cfg.attention_impl,
                         rope=cfg.decoder_position == "rope", decode=self.decode, dtype=dtype,
                         matmul_dtype=cfg.operand_dtype, name=f"block{i}")(x, memory, self_mask, cross_mask,
                                           positions=rope_positions, deterministic=not train,
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
  sequence of `grid_for(width)[1]` frames, each scored over the 10 digits and the CTC blank
  (`tokens.CTC_BLANK`, the last of `tokens.CTC_CLASSES`). The frames of padded columns
  (`ctc_frame_mask` False) are not defined: the loss must pass them as logit paddings.
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
    rows = cfg.grid[0]
    frames = memory.reshape(memory.shape[0], rows, -1, memory.shape[-1]).mean(axis=1)
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

  def encode(self, images, *, widths=None, train: bool = False):
    """images: [batch, H, W, C], widths: int [batch] or None -> memory [batch, patches, width]
    (see `Encoder`)."""
    return self.encoder(images, widths=widths, train=train)

  def column_logits(self, images, *, widths=None):
    """The CTC head's reading of the encoder's columns, without the decoder.

    images: [batch, H, W, C], widths: int [batch] or None -> float32 [batch, columns, 11]
    (see `CTCHead`; the frames of padded columns, `ctc_frame_mask` False, are not defined)."""
    if not self.config.ctc_head:
      raise ValueError("reading the columns needs a model built with model.ctc_head=True")
    return self.ctc_head(self.encode(images, widths=widths))

  def decode_tokens(self, decoder_inputs, memory, *, memory_mask=None, train: bool = False,
                    return_weights: bool = False):
    """decoder_inputs: int32 [batch, t], memory [batch, patches, width], memory_mask: bool
    [batch, patches] (`patch_mask`) or None -> logits [batch, t, vocab] (see `Decoder`)."""
    return self.decoder(decoder_inputs, memory, memory_mask=memory_mask, train=train,
                        return_weights=return_weights)

  def init_cache(self, memory, memory_mask=None, max_length: int | None = None):
    """Sizes the decode cache for `memory` and projects the memory into cross-attention
    keys/values; call with `mutable=['cache']` on a `decode=True` model and keep the cache.
    `memory_mask` (bool [batch, patches], `patch_mask`) is kept in the cache, so the decode
    steps attend only to the valid patches without being passed it again. `max_length`: the
    steps the cache holds (default and limit: `config.max_length`); fewer make each step
    attend over fewer slots."""
    length = max_length or self.config.max_length
    if not 0 < length <= self.config.max_length:
      raise ValueError(f"a decode cache of {length} steps: the decoder has "
                       f"model.max_length={self.config.max_length} positions")
    dummy = jnp.full((memory.shape[0], length), tokens.SOS, jnp.int32)
    return self.decoder(dummy, memory, memory_mask=memory_mask)

  def __call__(self, images, decoder_inputs, *, widths=None, train: bool = False,
               return_ctc: bool = False):
    """Teacher-forced pass.

    Args:
      images: float [batch, H, W, C], padded on the right past `widths`.
      decoder_inputs: int32 [batch, t], the target sequence shifted right (starts with <sos>).
      widths: int [batch] valid width of each image in pixels, or None (all valid, no mask).
      train: dropout and randomized positions (rngs 'dropout', optionally 'positions').
      return_ctc: also return the CTC head's logits (needs `config.ctc_head`).

    Returns:
      logits: float32 [batch, t, vocab]; with `return_ctc`, also ctc_logits float32
      [batch, columns, 11] (blank last, `tokens.CTC_BLANK`; the frames of padded columns,
      `ctc_frame_mask` False, are not defined).
    """
    if return_ctc and not self.config.ctc_head:
      raise ValueError("return_ctc needs a model built with model.ctc_head=True")
    memory = self.encode(images, widths=widths, train=train)
    memory_mask = None if widths is None else patch_mask(self.config, widths, images.shape[2])
    logits = self.decode_tokens(decoder_inputs, memory, memory_mask=memory_mask, train=train)
    if not (return_ctc or (self.config.ctc_head and self.is_initializing())):
      return logits
    ctc_logits = self.ctc_head(memory)  # Also at `init`, which creates the head's params.
    return (logits, ctc_logits) if return_ctc else logits
