"""The llama_jax modules import each other without a circle, counting imports inside functions too."""

import ast
import os

import llama_jax

PACKAGE_DIR = os.path.dirname(llama_jax.__file__)


def _imports(path: str) -> set[str]:
  """llama_jax modules that the file imports anywhere (module level or inside a function)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module == "llama_jax":
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama_jax."):
      found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("llama_jax."))
  return found


def import_graph() -> dict[str, set[str]]:
  modules = {f[:-3] for f in os.listdir(PACKAGE_DIR) if f.endswith(".py") and f != "__init__.py"}
  return {m: _imports(os.path.join(PACKAGE_DIR, m + ".py")) & modules for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state = {}  # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
      if nxt not in state and (cycle := visit(nxt, path + [nxt])):
        return cycle
    state[node] = 2
    return None

  for start in sorted(graph):
    if start not in state and (cycle := visit(start, [start])):
      return cycle
  return None


def test_no_import_circle_among_llama_jax_modules():
  graph = import_graph()
  assert {"trainer", "generate", "evaluate", "run_setup"} <= set(graph)
  assert "run_setup" in graph["generate"] and "generate" in graph["trainer"]  # the graph is really read
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
