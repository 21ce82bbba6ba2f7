"""The house's one-way layering, checked by parsing imports: ops <- modeling <- training/evaluation
<- experiments; data/ stands apart (numpy/tf only); nothing imports upward."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "maskrcnn_jax"
# For each subpackage, the maskrcnn_jax subpackages it must not import.
FORBIDDEN = {
    "ops": {"modeling", "training", "evaluation", "data", "convert", "experiments"},
    "modeling": {"training", "evaluation", "data", "convert", "experiments"},
    "data": {"ops", "modeling", "training", "evaluation", "convert", "experiments"},
    "convert": {"training", "evaluation", "data", "experiments"},
    "training": {"evaluation", "experiments"},
    "evaluation": {"experiments"},
}
THIRD_PARTY_FORBIDDEN = {"ops": {"flax"}, "data": {"jax", "flax", "optax", "orbax"}}


def _imports(path):
  """Every module `path` imports, absolute: relative imports resolved against its package, and
  `from a import b` also yields `a.b` (b may be a subpackage, as in `from maskrcnn_jax import
  training`)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = list(path.relative_to(PKG.parent).parent.parts)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name
    elif isinstance(node, ast.ImportFrom):
      base = package[:len(package) - (node.level - 1)] if node.level else []
      module = ".".join(base + ([node.module] if node.module else []))
      if module:
        yield module
      for a in node.names:
        yield f"{module}.{a.name}" if module else a.name


def test_relative_and_from_imports_are_seen(monkeypatch):
  f = PKG / "modeling" / "x.py"
  monkeypatch.setattr(pathlib.Path, "read_text", lambda self: (
      "from ..training import trainer\nfrom maskrcnn_jax import evaluation\nfrom . import rpn\n"))
  found = set(_imports(f))
  assert {"maskrcnn_jax.training.trainer", "maskrcnn_jax.evaluation",
          "maskrcnn_jax.modeling.rpn"} <= found


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_no_upward_imports(sub):
  files = sorted((PKG / sub).rglob("*.py"))
  assert files, f"maskrcnn_jax/{sub} has no modules"
  bad = []
  for f in files:
    for name in _imports(f):
      parts = name.split(".")
      if parts[0] == "maskrcnn_jax" and len(parts) > 1 and parts[1] in FORBIDDEN[sub]:
        bad.append(f"{f.relative_to(PKG.parent)} imports {name}")
      if parts[0] in THIRD_PARTY_FORBIDDEN.get(sub, ()):
        bad.append(f"{f.relative_to(PKG.parent)} imports {name}")
  assert not bad, "\n".join(bad)
