"""The package's import graph (module-level and function-level imports alike) has no
cycle: a lower layer (models, paths, errors) never reaches back into one above it."""
import ast
import pathlib

import glora_jax

ROOT = pathlib.Path(glora_jax.__file__).parent


def import_graph() -> dict[str, set[str]]:
  """{module: the glora_jax modules it imports}, from the source, imports anywhere."""
  modules = {}
  for file in ROOT.rglob('*.py'):
    name = '.'.join(file.relative_to(ROOT.parent).with_suffix('').parts)
    modules[name.removesuffix('.__init__')] = file
  graph = {}
  for name, file in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(file.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('glora_jax'):
        for alias in node.names:  # `from glora_jax.models import bert` names a module
          full = f'{node.module}.{alias.name}'
          targets.add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        targets.update(a.name for a in node.names if a.name.startswith('glora_jax'))
    graph[name] = {t for t in targets if t in modules and t != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert len(graph) > 30 and 'glora_jax.models.registry' in graph['glora_jax.train.tasks']
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None
