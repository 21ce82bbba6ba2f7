"""maskrcnn_jax.data imports numpy, tensorflow, tfds, pycocotools, PIL and stdlib only."""
import ast
import pathlib
import sys

import maskrcnn_jax.data

ALLOWED = {"numpy", "tensorflow", "tensorflow_datasets", "pycocotools", "PIL"}
DATA_DIR = pathlib.Path(maskrcnn_jax.data.__file__).parent


def _imports(path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        yield "maskrcnn_jax.data." + (node.module or "")
      else:
        yield node.module


def test_data_imports_only_allowed_modules():
  files = sorted(DATA_DIR.rglob("*.py"))
  assert len(files) >= 6
  for path in files:
    for name in _imports(path):
      top = name.split(".")[0]
      if top == "maskrcnn_jax":
        assert name.startswith("maskrcnn_jax.data"), (path.name, name)
      else:
        assert top in ALLOWED or top in sys.stdlib_module_names, (path.name, name)


def test_preprocess_is_numpy_only():
  for name in _imports(DATA_DIR / "preprocess.py"):
    assert name.split(".")[0] in {"math", "numpy"}, name


def test_package_init_does_not_import_tensorflow_eagerly():
  names = list(_imports(DATA_DIR / "__init__.py"))
  assert names == ["importlib"], names
