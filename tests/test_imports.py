"""The modules of `digit_vit` import each other without a cycle.

A cycle makes a module's import order matter and hides what depends on what; one of them
(`train` <-> `trained`) was only hidden by a function-level import. So the graph here counts
every import of a module, at its top or inside a function, read from the source with `ast`
(nothing is imported, so the test runs in a second).
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "digit_vit"


def _modules() -> dict[str, pathlib.Path]:
  """{dotted module name: its file} of every module of the package, packages as their
  __init__."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
  """The package's modules that module `name` imports anywhere in its source.

  `from P import X` counts as an import of `P.X` where that is a module, else of `P`. A
  submodule's import is not counted as one of its parent packages: Python runs the parent's
  __init__ first, but a parent that imports its own submodules is no cycle.
  """
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: from the module's package, up `level - 1` more.
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
      for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
  return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for other in sorted(graph[node]):
      if other not in index:
        visit(other)
        low[node] = min(low[node], low[other])
      elif other in on_stack:
        low[node] = min(low[node], index[other])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def test_the_import_graph_is_read():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  # Imports at the top, inside functions, of submodules and of names all count.
  assert "digit_vit.steps" in graph["digit_vit.train"]
  assert "digit_vit.data.input_pipeline" in graph["digit_vit.config_checks"]
  assert "digit_vit.models" in graph["digit_vit.train"]
  assert "digit_vit.models.reader" in graph["digit_vit.steps"]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_digit_vit_has_no_import_cycle():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  assert _cycles(graph) == []
