"""Flax modules of digit_vit; `build_model(config)` makes the model of a config's task."""

from digit_vit import tasks
from digit_vit.models.classifier import ViTClassifier
from digit_vit.models.reader import DigitReader, ModelConfig

# The classes a task names (`tasks.Task.model`).
_MODELS = {"DigitReader": DigitReader, "ViTClassifier": ViTClassifier}


def build_model(config, *, decode: bool = False):
  """The model a full experiment config asks for: its task's (`tasks.get(config).model`).

  decode: build a reader's decoder in single-token cached mode (a classifier has none).
  """
  task = tasks.get(config)
  model_config = ModelConfig.from_config(config.model)
  model = _MODELS[task.model]
  return model(model_config, decode=decode) if task.reads_lines else model(model_config)


__all__ = ["DigitReader", "ModelConfig", "ViTClassifier", "build_model"]
