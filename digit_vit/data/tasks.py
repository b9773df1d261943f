"""Which data module serves a task: `input_module(config)`.

A module of its own rather than the package's __init__, which every `digit_vit.data` module
runs first: the pipelines this reaches bring TensorFlow and place arrays on devices, and
`sources` or `compose` alone should not.
"""


def input_module(config):
  """The data module of `config.task`: `input_pipeline` (lines to read) or `classification`
  (single images to classify); both have `get_dataset_builder`, `train_iterator`,
  `eval_iterator` and `num_examples`."""
  # Imported only when asked for: both bring TensorFlow.
  if config.task == "read":
    from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
    return input_pipeline
  if config.task == "classify":
    from digit_vit.data import classification  # pylint: disable=import-outside-toplevel
    return classification
  raise ValueError(f"config.task={config.task!r} is not 'read' or 'classify'")
