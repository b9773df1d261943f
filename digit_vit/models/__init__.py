"""Flax modules of digit_vit; `build_model(config)` picks one from a config."""

from digit_vit.models.classifier import ViTClassifier
from digit_vit.models.reader import DigitReader, ModelConfig


def build_model(config, *, decode: bool = False):
  """The model a full experiment config asks for (`config.task`: 'read' or 'classify')."""
  model_config = ModelConfig.from_config(config.model)
  if config.task == "read":
    return DigitReader(model_config, decode=decode)
  if config.task == "classify":
    return ViTClassifier(model_config)
  raise ValueError(f"config.task={config.task!r} is not 'read' or 'classify'")


__all__ = ["DigitReader", "ModelConfig", "ViTClassifier", "build_model"]
