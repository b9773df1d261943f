"""Encoder-only ViT classifier with a class token (single MNIST digits, CIFAR-10)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from digit_vit.models import layers
from digit_vit.models.reader import Encoder, ModelConfig


class ViTClassifier(nn.Module):
  """Patches -> encoder (with a class token) -> MLP head on the class token's output."""
  config: ModelConfig

  @nn.compact
  def __call__(self, images, *, widths=None, train: bool = False):
    """images: [batch, H, W, C], widths: int [batch] valid widths in pixels or None (see
    `Encoder`) -> logits float32 [batch, num_classes]."""
    cfg = self.config
    if not cfg.class_token:
      cfg = dataclasses.replace(cfg, class_token=True)
    x = Encoder(cfg, name="encoder")(images, widths=widths, train=train)
    cls = x[:, 0]
    if cfg.norm == "post":
      cls = nn.LayerNorm(dtype=cfg.compute_dtype, name="head_norm")(cls)
    cls = nn.tanh(layers.Dense(cfg.width, dtype=cfg.compute_dtype, name="pre_logits")(cls))
    return layers.Dense(cfg.num_classes, dtype=cfg.compute_dtype,
                        name="head")(cls).astype(jnp.float32)
