"""The data module of a config's task: `input_module(config)`.

A module of its own rather than the package's __init__, which every `digit_vit.data` module
runs first: the pipelines this reaches bring TensorFlow and place arrays on devices, and
`sources` or `compose` alone should not. Nor is it a method of `digit_vit.tasks.Task`: that
module stays free of them, for the models and metrics that import it.
"""

from digit_vit import tasks


def input_module(config):
  """The data module of the config's task (`tasks.Task.input_module`): `input_pipeline` (lines
  to read) or `classification` (single images to classify); both have `get_dataset_builder`,
  `train_iterator`, `eval_iterator` and `num_examples`.

  Raises:
    ValueError: an unknown `config.task`.
  """
  name = tasks.get(config).input_module
  # Imported only when asked for: both bring TensorFlow.
  # pylint: disable-next=import-outside-toplevel
  from digit_vit.data import classification, input_pipeline
  return {"input_pipeline": input_pipeline, "classification": classification}[name]
