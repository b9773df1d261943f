"""Each task's object wires what it says, and nothing else in the package reads `config.task`
to switch between them."""

import ast
import pathlib

import pytest

from digit_vit import config_lib, metrics, tasks
from digit_vit.data.tasks import input_module
from digit_vit.models import DigitReader, ViTClassifier, build_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASK_NAMES = ("read", "classify")

# Nothing here touches devices, but the data module reaches the input pipelines, which do, so
# the module is not marked as a whole (tests/test_device_passes.py); each test is.


@pytest.mark.any_device_count
def test_the_reader_task_wires_the_reader():
  config = config_lib.load("default")
  task = tasks.get(config)
  assert task is tasks.READ and task.name == "read" and task.reads_lines
  model = build_model(config)
  assert isinstance(model, DigitReader) and type(model).__name__ == task.model
  assert build_model(config, decode=True).decode
  assert input_module(config).__name__ == "digit_vit.data.input_pipeline"
  assert metrics.main_metric(config) == task.main_metric == "exact_match"
  assert task.target == "tokens"
  assert ("validation", "exact_match") in task.accuracy_curves


@pytest.mark.any_device_count
@pytest.mark.parametrize("name", ["mnist_vit", "cifar10_vit", "digit_probe"])
def test_the_classifier_task_wires_the_classifier(name):
  config = config_lib.load(name)
  task = tasks.get(config)
  assert task is tasks.CLASSIFY and task.name == "classify" and not task.reads_lines
  model = build_model(config)
  assert isinstance(model, ViTClassifier) and type(model).__name__ == task.model
  assert input_module(config).__name__ == "digit_vit.data.classification"
  assert metrics.main_metric(config) == task.main_metric == "accuracy"
  assert task.target == "label"
  assert task.accuracy_curves == (("train", "accuracy"), ("validation", "accuracy"))


@pytest.mark.any_device_count
def test_every_shipped_config_names_a_known_task():
  assert tasks.NAMES == TASK_NAMES
  for path in sorted(config_lib.CONFIG_DIR.glob("*.py")):
    assert tasks.get(config_lib.load(path)).name in TASK_NAMES, path


@pytest.mark.any_device_count
def test_an_unknown_task_is_an_error_naming_the_known_ones():
  config = config_lib.load("tiny")
  config.task = "segment"
  with pytest.raises(ValueError, match=r"config.task='segment' is not one of \('read', "
                                       r"'classify'\)"):
    tasks.get(config)
  for call in (build_model, input_module, metrics.main_metric):
    with pytest.raises(ValueError, match="is not one of"):
      call(config)
  # A saved config without the field is a reader's.
  assert tasks.get({}) is tasks.READ
  with pytest.raises(ValueError, match="is not one of"):
    tasks.by_name(None)


def _is_task(node) -> bool:
  """Whether an expression is a task as the config names it: `task`, `x.task`, `x['task']`."""
  return ((isinstance(node, ast.Name) and node.id == "task")
          or (isinstance(node, ast.Attribute) and node.attr == "task")
          or (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
              and node.slice.value == "task"))


def _task_switches(path: pathlib.Path) -> list[str]:
  """Where `path`'s code reads the config's task itself (`config.task`, `config.get('task')`)
  or compares a task's name (`task == 'read'`, `result['task'] != ...`). Docstrings and
  comments are no code; keyword arguments (`load_config(..., task='read')`) and looking a
  recorded name up (`tasks.by_name(result['task'])`) compare nothing."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
    if isinstance(node, ast.Attribute) and node.attr == "task":
      found.append(f"{where}: {ast.unparse(node)}")
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "get" and node.args and isinstance(node.args[0], ast.Constant)
          and node.args[0].value == "task"):
      found.append(f"{where}: {ast.unparse(node)}")
    elif isinstance(node, ast.Compare) and any(
        isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops) and any(
        _is_task(side) for side in [node.left, *node.comparators]):
      found.append(f"{where}: {ast.unparse(node)}")
  return found


@pytest.mark.any_device_count
def test_the_task_is_read_in_one_place():
  """digit_vit/tasks.py alone reads `config.task`; everything else asks its `Task`."""
  sources = [p for p in sorted((ROOT / "digit_vit").rglob("*.py"))
             if p != ROOT / "digit_vit" / "tasks.py"]
  sources += sorted((ROOT / "experiments").rglob("*.py"))
  assert len(sources) > 40
  found = [hit for path in sources for hit in _task_switches(path)]
  assert found == [], "ask digit_vit.tasks.get(config) instead:\n" + "\n".join(found)
  # The check sees what it looks for.
  tasks_file = ROOT / "digit_vit" / "tasks.py"
  assert any("config.get('task'" in hit for hit in _task_switches(tasks_file))
