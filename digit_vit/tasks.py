"""The two tasks, one object each: `get(config)` is the one place that reads `config.task`.

- `READ` ('read'): a line of digits -> its digits. The `DigitReader` (encoder-decoder) is
  trained teacher-forced on the line's token sequence and evaluated by decoding it freely
  (`digit_vit.data.input_pipeline`'s `multi_digit_mnist` lines).
- `CLASSIFY` ('classify'): one image -> one of `model.num_classes` labels, the
  `ViTClassifier` (`digit_vit.data.classification`: single MNIST digits, CIFAR-10).

The rest of the package asks the task rather than comparing `config.task` with a name, so a
switch between the two lives here alone. Each field says what the code does with it. The
module imports nothing of the package: the models package and the metrics import it, and the
input modules (TensorFlow) are loaded by `digit_vit.data.tasks.input_module` when asked for.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Task:
  """What a task trains, on what, and how it is measured.

  Attributes:
    name: its `config.task`.
    model: the class of `digit_vit.models` that `models.build_model` makes for it.
    input_module: the module of `digit_vit.data` that feeds it (`data.tasks.input_module`):
      `get_dataset_builder`, `train_iterator`, `eval_iterator`, `num_examples`.
    target: the batch key of what the loss is taken against: 'tokens' (int32 [b, L], the line
      as <sos> digits <eos> <pad>...) or 'label' (int32 [b]).
    main_metric: the validation metric (of `metrics.summarize`, higher is better) that ranks
      the checkpoints and picks 'best'.
    accuracy_curves: the (split, metric) curves of the accuracy plots (`reporting`).
    reads_lines: the model reads a line into a sequence of digit tokens. Only then: the
      decoder (at least one layer), <pad> and per-token class weights in the loss, the CTC
      head, decoding by beam search, the readings' confidence calibration, `max_digits` and
      `decode.max_length`, and the 'wild' and 'long' image-file splits.
  """
  name: str
  model: str
  input_module: str
  target: str
  main_metric: str
  accuracy_curves: tuple[tuple[str, str], ...]
  reads_lines: bool


READ = Task(name="read", model="DigitReader", input_module="input_pipeline", target="tokens",
            main_metric="exact_match",
            accuracy_curves=(("train", "accuracy"), ("validation", "token_accuracy"),
                             ("validation", "exact_match")),
            reads_lines=True)
CLASSIFY = Task(name="classify", model="ViTClassifier", input_module="classification",
                target="label", main_metric="accuracy",
                accuracy_curves=(("train", "accuracy"), ("validation", "accuracy")),
                reads_lines=False)

TASKS = {task.name: task for task in (READ, CLASSIFY)}
NAMES = tuple(TASKS)  # ('read', 'classify')


def by_name(name: str) -> Task:
  """The task called `name` ('read' or 'classify').

  Raises:
    ValueError: naming the known tasks.
  """
  try:
    return TASKS[name]
  except (KeyError, TypeError):
    raise ValueError(f"config.task={name!r} is not one of {NAMES}") from None


def get(config) -> Task:
  """The task of a config (a ConfigDict, or a run's saved config): its `config.task`; a config
  without the field is taken as a reader's, the default task.

  Raises:
    ValueError: an unknown task, naming the known ones.
  """
  return by_name(config.get("task", READ.name))
