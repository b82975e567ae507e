"""The package's import graph, read from the source: no module depends on itself through others.

Imports inside functions count too: they hide a cycle from Python's import machinery, not
from a reader, who can no longer understand or test either module alone.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nin_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  """module -> the modules of the package it imports anywhere in its source (nested included)."""
  modules = {_module_name(p): p for p in package.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        imported |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    graph[name] = {m for m in imported if m in modules and m != name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Each import cycle once, as the path from its first module back to that module."""
  found, done = [], set()

  def visit(module: str, path: list[str]) -> None:
    if module in path:
      cycle = path[path.index(module) :]
      if not any(set(cycle) == set(c) for c in found):
        found.append(cycle + [module])
      return
    if module in done:
      return
    for imported in sorted(graph[module]):
      visit(imported, path + [module])
    done.add(module)

  for module in sorted(graph):
    visit(module, [])
  return found


def test_cycles_are_found_in_a_graph_that_has_them():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert cycles(graph) == [["a", "b", "c", "a"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert {"nin_jax.train", "nin_jax.imagenet", "nin_jax.onednn"} <= set(graph)  # The graph was read.
  assert "nin_jax.batches" in graph["nin_jax.imagenet"]  # Nested and `from nin_jax import x` both count.
  assert cycles(graph) == []
