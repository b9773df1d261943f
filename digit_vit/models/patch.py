"""Patch embedding: images -> a sequence of patch tokens.

'linear' cuts the image into non-overlapping (ph, pw) patches and projects each flattened
patch with one matrix (the ViT paper's "linear projection of flattened patches"). 'conv' is a
small convolutional stem: 3x3 convolutions of stride 2 until the patch size is reached, which
gives each token a view slightly wider than its patch. `stem_depth` adds residual 3x3
convolutions of stride 1 after each of them: more of a CNN's feature extraction before the
transformer (+0.5-0.9 points of single-digit accuracy in `configs/digit_probe.py`), at a cost
to the train step on a CPU, since they run at every resolution (docs/performance.md, "The
stem's convolutions").

Images may be padded on the right (with zeros, the background) to a bucket width, with each
image's valid width in `widths`. Every patch column that starts inside the valid width comes
out exactly as it would from the image cut at the end of its last such column
(`valid_width`): pixels past `widths` are zeroed, and the 'conv' stem zeroes its feature maps
past the valid columns before every conv that reads a neighbour to the right at the same
resolution (column stride 1), as its zero padding does at the image's edge. A stride-2 conv
needs nothing: a valid output reads no input past the valid width.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from digit_vit.models import layers

KINDS = ("linear", "conv")


def grid_shape(image_hw: tuple[int, int], patch_size: tuple[int, int]) -> tuple[int, int]:
  """(rows, cols) of patches; raises if the patches do not tile the image."""
  (h, w), (ph, pw) = image_hw, patch_size
  if h % ph or w % pw:
    raise ValueError(
        f"patch size {ph}x{pw} does not tile the {h}x{w} canvas; choose a patch size that "
        "divides both sides or change image_height/image_width")
  return h // ph, w // pw


def stem_strides(patch_size: tuple[int, int]) -> list[tuple[int, int]]:
  """Per-conv (row, col) strides whose products equal the patch size (powers of two)."""
  ph, pw = patch_size
  for p in (ph, pw):
    if p < 1 or p & (p - 1):
      raise ValueError(f"the conv stem needs power-of-two patch sides, got {ph}x{pw}; "
                       "use model.patch_embedding='linear'")
  steps = max(int(math.log2(ph)), int(math.log2(pw)), 1)
  return [(2 if 2 ** i < ph else 1, 2 if 2 ** i < pw else 1) for i in range(steps)]


def valid_width(widths, patch_width: int):
  """Valid widths in pixels rounded up to whole patch columns: int32 [batch]. A column that
  starts before `widths` holds ink, so it is read whole (its pixels past `widths` zeroed)."""
  widths = jnp.asarray(widths, jnp.int32)
  return -(-widths // patch_width) * patch_width


def _zero_past(x, valid_cols):
  """x [b, h, w, c] with columns >= valid_cols [b] set to 0."""
  keep = jnp.arange(x.shape[2])[None, :] < valid_cols[:, None]               # [b, w]
  return jnp.where(keep[:, None, :, None], x, jnp.zeros((), x.dtype))


def _neighbourhoods(x, stride):
  """The 3x3 neighbourhood of every output pixel of a stride-`stride` convolution, stacked on
  the channel axis: [b, h, w, c] -> [b, h/sh, w/sw, 9c] (zero padding of 1).

  A Dense layer on this is a 3x3 convolution; `Conv3x3` computes it so for one input channel.
  """
  b, h, w, c = x.shape
  sh, sw = stride
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows, cols = h // sh, w // sw
  return jnp.concatenate(
      [padded[:, i:i + sh * rows:sh, j:j + sw * cols:sw, :] for i in range(3) for j in range(3)],
      axis=-1)


class Conv3x3(nn.Module):
  """A 3x3 convolution with zero padding of 1: [b, h, w, c] -> [b, h/sh, w/sw, features].

  Its parameters are a Dense layer's on `_neighbourhoods(x, stride)`: kernel [9 * c, features],
  whose rows run in (row, column, channel) order so that it reshapes to HWIO, and bias
  [features]. Checkpoints of the stem from before it ran `lax.conv` therefore load unchanged.

  On XLA's CPU backend `lax.conv` ran `configs/long.py`'s stem (two residual convs a stage, up
  to 128 channels) twice as fast as the neighbourhoods and one matmul, forward and backward, and
  its train step 1.4-1.7x as fast in the bench. The image's one-channel conv keeps the matmul,
  with which that step ran 5% faster than with `lax.conv` there (docs/performance.md, "The stem's
  convolutions").
  """
  features: int
  stride: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (9 * c, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if c == 1:
      return layers.affine(_neighbourhoods(x, self.stride), kernel, bias)
    y = jax.lax.conv_general_dilated(
        x, kernel.reshape(3, 3, c, self.features), self.stride, ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class PatchEmbedding(nn.Module):
  """Attributes:
    patch_size: (height, width) of a patch.
    width: output channels (d_model).
    kind: 'linear' or 'conv'.
    stem_channels: channels of the first stem conv; doubled after each conv.
    stem_max_channels: the doubling stops here (0 = no limit).
    stem_depth: residual stride-1 3x3 convs after each strided conv of the 'conv' stem.
  """
  patch_size: tuple[int, int]
  width: int
  kind: str = "linear"
  stem_channels: int = 32
  stem_depth: int = 0
  stem_max_channels: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, widths=None):
    """Args:
      images: [batch, H, W, C].
      widths: int [batch] valid width of each image in pixels (the rest is padding), or None
        (all valid: no masking at all). Tokens of columns that start before it equal those of
        the image cut at `valid_width(widths)`; the others are not defined.

    Returns:
      tokens [batch, (H/ph) * (W/pw), width] in raster order.
    """
    b, h, w, c = images.shape
    rows, cols = grid_shape((h, w), tuple(self.patch_size))
    ph, pw = self.patch_size
    if self.kind not in KINDS:
      raise ValueError(f"unknown patch embedding {self.kind!r}; use one of {KINDS}")
    if self.stem_depth < 0:
      raise ValueError(f"model.stem_depth must be >= 0, got {self.stem_depth}")
    if self.stem_max_channels < 0:
      raise ValueError(f"model.stem_max_channels must be >= 0, got {self.stem_max_channels}")
    if self.kind == "linear" and (self.stem_depth or self.stem_max_channels):
      # Silently ignoring them would make a sweep over them measure nothing.
      raise ValueError(
          f"model.stem_depth={self.stem_depth} and model.stem_max_channels="
          f"{self.stem_max_channels} shape the 'conv' stem; the 'linear' patch embedding has "
          "none: set them to 0 or use model.patch_embedding='conv'")
    x = images.astype(self.dtype)
    valid = None
    if widths is not None:
      widths = jnp.asarray(widths, jnp.int32)
      x = _zero_past(x, widths)
      valid = valid_width(widths, pw)  # Columns of the image; at column stride s, valid // s.
    if self.kind == "linear":
      x = x.reshape(b, rows, ph, cols, pw, c).transpose(0, 1, 3, 2, 4, 5)
      x = x.reshape(b, rows * cols, ph * pw * c)
      return layers.Dense(self.width, dtype=self.dtype, name="projection")(x)

    col_stride = 1  # Of the map `x`, relative to the image.

    def conv(x, channels, stride, name):
      """A 3x3 convolution and gelu. With padding, whatever the conv reads past the valid
      columns is what the unpadded map's edge shows it: zeros."""
      if valid is not None and stride[1] == 1:
        # A stride-2 conv's valid outputs never read past the valid columns.
        x = _zero_past(x, valid // col_stride)
      return nn.gelu(Conv3x3(channels, stride, dtype=self.dtype, name=name)(x))

    for i, stride in enumerate(stem_strides((ph, pw))):
      channels = self.stem_channels * 2 ** i
      if self.stem_max_channels:
        channels = min(channels, self.stem_max_channels)
      x = conv(x, channels, stride, f"conv{i}")
      col_stride *= stride[1]
      for j in range(self.stem_depth):
        x = x + conv(x, channels, (1, 1), f"conv{i}_{j}")
    x = layers.Dense(self.width, dtype=self.dtype, name="projection")(x)
    return x.reshape(b, rows * cols, self.width)
