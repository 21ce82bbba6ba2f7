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
