"""The package's import graph, read from the source: no module depends on itself through others,
and each part below the top (`model/`, `data/`, `run/`) imports only itself and `nin_jax.errors`.

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


PARTS = ("nin_jax.model", "nin_jax.data", "nin_jax.run")
SHARED = {"nin_jax", "nin_jax.errors"}  # The package's __init__ (environment only) and the error types.


def _part(module: str) -> str | None:
  return next((p for p in PARTS if module == p or module.startswith(p + ".")), None)


def crossings(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  """(importer, imported) for each import by a part's module of anything outside its part but the shared."""
  return sorted(
    (module, imported)
    for module, imports in graph.items()
    if _part(module)
    for imported in imports
    if imported not in SHARED and _part(imported) != _part(module)
  )


def test_crossings_are_found_in_a_graph_that_has_them():
  graph = {
    "nin_jax.model.models": {"nin_jax.model.layers", "nin_jax.errors", "nin_jax.data.datasets"},
    "nin_jax.run.lock": {"nin_jax.configs"},
    "nin_jax.train": {"nin_jax.model.models", "nin_jax.run.lock"},  # The top composes the parts.
  }
  assert crossings(graph) == [
    ("nin_jax.model.models", "nin_jax.data.datasets"),
    ("nin_jax.run.lock", "nin_jax.configs"),
  ]


def test_each_part_imports_only_itself_and_the_shared_modules():
  graph = import_graph()
  assert set(PARTS) <= set(graph) and "nin_jax.model.layers" in graph  # The parts were read.
  assert crossings(graph) == []


def test_cycles_are_found_in_a_graph_that_has_them():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert cycles(graph) == [["a", "b", "c", "a"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert {"nin_jax.train", "nin_jax.data.imagenet", "nin_jax.model.onednn"} <= set(graph)  # The graph was read.
  assert "nin_jax.data.batches" in graph["nin_jax.data.imagenet"]  # Nested and `from nin_jax import x` both count.
  assert cycles(graph) == []
