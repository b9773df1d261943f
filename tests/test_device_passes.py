"""`make test` runs the suite on one device, then again on 8 fake devices without the tests
marked `any_device_count`. A test module marked as a whole must therefore cover only code that
never touches devices; this checks that, by reading the sources (no import, no JAX).
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("digit_vit", "experiments")
# Where code reads the device count, places or shards arrays, or reduces over devices.
DEVICE_USE = re.compile(
    r"jax\.devices|local_devices|device_count|device_put|make_array_from|process_index|"
    r"process_count|jax\.sharding|NamedSharding|\bMesh\b|pmap|shard_map|psum|pmean|axis_name|"
    r"with_sharding_constraint")


def _module_file(name: str) -> pathlib.Path | None:
  path = ROOT.joinpath(*name.split("."))
  for candidate in (path.with_suffix(".py"), path / "__init__.py"):
    if candidate.is_file():
      return candidate
  return None


def _imported_modules(path: pathlib.Path) -> set[str]:
  """The project modules `path` imports, with the packages Python imports on the way."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}: the project imports absolutely; this reader expects that"
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)  # Submodules.
  project = {n for n in names if n.split(".")[0] in PACKAGES and _module_file(n)}
  return project | {p for n in project for p in _parents(n)}


def _parents(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _modules_reached(path: pathlib.Path) -> set[str]:
  seen, todo = set(), list(_imported_modules(path))
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(_imported_modules(_module_file(name)) - seen)
  return seen


def _marked_as_a_whole(path: pathlib.Path) -> bool:
  for node in ast.parse(path.read_text()).body:
    if (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
        and "any_device_count" in ast.unparse(node.value)):
      return True
  return False


def test_the_reach_of_imports_is_followed():
  reached = _modules_reached(ROOT / "tests" / "test_train.py")
  assert {"digit_vit", "digit_vit.train", "digit_vit.models", "digit_vit.models.tokens",
          "digit_vit.data.input_pipeline"} <= reached
  assert DEVICE_USE.search(_module_file("digit_vit.train").read_text())


def test_modules_marked_any_device_count_cover_only_code_that_never_touches_devices():
  marked = [p for p in sorted((ROOT / "tests").glob("test_*.py")) if _marked_as_a_whole(p)]
  assert len(marked) >= 10, [p.name for p in marked]
  for path in marked:
    for name in sorted(_modules_reached(path)):
      source = _module_file(name).read_text()
      found = DEVICE_USE.search(source)
      assert not found, (
          f"{path.name} is marked any_device_count, but it reaches {name}, which uses "
          f"{found.group()!r}: take the mark off, so that `make test` runs it on 8 devices too.")
