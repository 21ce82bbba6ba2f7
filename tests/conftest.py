"""Shared test set-up: TensorFlow off any GPU, sane thread counts on the 2-core machine."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  # torchvision segfaults when imported after TensorFlow in one process (its image extension and
  # TF's bundled libraries clash), while the other order is fine: import torch's side first.
  try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
  except ImportError:  # test-only dependencies absent: the reference tests skip themselves.
    pass
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def torch_or_skip():
  """Imports torch and torchvision (test-only dependencies) with 2 threads."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.set_num_threads(2)
  return torch, torchvision


def quick_variables(model, seed=0):
  """Random variables for `model` without compiling its initializer (seconds saved per test):
  the shapes from `jax.eval_shape`, kernels ~ N(0, 1 / fan_in), biases 0, norm scales and
  variances 1, means 0. For tests that need working weights, not flax's exact initialization."""
  import jax
  from flax import traverse_util

  from maskrcnn_jax.modeling.mask_rcnn import init_variables
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  out = {}
  for collection, tree in shapes.items():
    flat = {}
    for path, s in traverse_util.flatten_dict(tree).items():
      if path[-1] == "kernel":
        fan_in = int(np.prod(s.shape[:-1]))
        value = rng.normal(0, 1 / np.sqrt(fan_in), s.shape)
      elif path[-1] in ("scale", "weight", "running_var"):
        value = np.ones(s.shape)
      else:
        value = np.zeros(s.shape)
      flat[path] = np.asarray(value, s.dtype)
    out[collection] = traverse_util.unflatten_dict(flat)
  return out
