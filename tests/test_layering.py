"""The package's floor plan: no import circle among the modules of adjax and data_pipelines
(imports inside functions count), and no module of adjax over 450 lines."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("adjax", "data_pipelines")
MAX_LINES = 450


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in PACKAGES:
    for path in sorted((REPO / package).rglob("*.py")):
      parts = list(path.relative_to(REPO).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      found[".".join(parts)] = path
  return found


def _known(name: str, modules) -> str | None:
  """The longest prefix of a dotted name that is one of our modules."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """module -> the modules it imports, anywhere in its body. `from pkg import name` counts as
  an import of `pkg.name` when that is a module, else of `pkg`."""
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets |= {_known(alias.name, modules) for alias in node.names}
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = package.split(".")[:len(package.split(".")) - node.level + 1]
          source = ".".join(base + ([node.module] if node.module else []))
        else:
          source = node.module or ""
        for alias in node.names:
          full = f"{source}.{alias.name}"
          targets.add(full if full in modules else _known(source, modules))
    graph[name] = {t for t in targets if t and t != name}
  return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_circle():
  found = circles(import_graph(_modules()))
  assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_circle_finder_finds_a_circle():
  # The check itself can fail: a two-module circle and a three-module one are found.
  graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
  assert sorted(circles(graph)) == [["a", "b"], ["c", "d", "e"]]


@pytest.mark.parametrize("source,expected", [
    ("import adjax.io.files\n", {"adjax.io.files"}),
    ("def f():\n  from adjax.evaluate import loop\n", {"adjax.evaluate.loop"}),
    ("from adjax.io import files\n", {"adjax.io.files"}),
    ("from adjax.errors import UserError\n", {"adjax.errors"}),
])
def test_imports_inside_functions_and_from_imports_count(tmp_path, source, expected):
  modules = _modules()
  probe = tmp_path / "probe.py"
  probe.write_text(source)
  assert import_graph({**modules, "adjax.probe": probe})["adjax.probe"] == expected


def test_no_module_of_adjax_is_over_450_lines():
  long = {str(p.relative_to(REPO)): n for name, p in _modules().items()
          if name.startswith("adjax") and (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"
