"""Shared by the training tests and their subprocess worker: the test config and helpers."""
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_config(cache_dir, overrides=None):
  """configs/tiny.py's model trimmed for speed, on 64 px shapes, 6 steps of batch 2.

  Args:
    cache_dir: config.data.cache_dir (the shapes folder, generated once per session).
    overrides: {'training.steps': 3, ...} dotted keys.
  """
  from configs import tiny
  c = tiny.get_config()
  m = c.model
  m.rpn.post_nms_topk_train = 256
  m.roi_sampler.batch_size_per_image = 128
  m.mask_head.num_rois = 32
  d = c.data
  d.cache_dir = cache_dir
  d.shapes.update(dict(num_train=16, num_val=4, seed=1, image_size=64))
  d.image_size = (64, 64)
  d.shuffle_buffer = 16
  t = c.training
  t.steps = 6
  t.batch_size = 2
  t.learning_rate = 0.01
  t.warmup_steps = 2
  t.log_every = 1
  t.checkpoint_every = 3
  t.keep_checkpoints = 3
  for key, value in (overrides or {}).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def flat_params(state):
  """{'a/b/kernel': float32 numpy} of a TrainState's params (replicated arrays)."""
  from flax import traverse_util

  from maskrcnn_jax.training import parallel
  params = parallel.to_host(state.params)
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def env(num_devices=1, **extra):
  """Environment of a subprocess: forced CPU device count, the session's compilation cache."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") +
                    f" --xla_force_host_platform_device_count={num_devices}").strip()
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  e["JAX_PLATFORMS"] = "cpu"
  e.update({k: str(v) for k, v in extra.items()})
  return e


def start_worker(spec_path, num_devices=1, **extra_env):
  """`python -m tests.training.worker SPEC` in the background (stdout+stderr to SPEC.log)."""
  log = open(str(spec_path) + ".log", "w")
  return subprocess.Popen([sys.executable, "-m", "tests.training.worker", str(spec_path)],
                          cwd=REPO, env=env(num_devices, **extra_env), stdout=log,
                          stderr=subprocess.STDOUT)


def log_tail(spec_path, n=3000):
  with open(str(spec_path) + ".log") as f:
    return f.read()[-n:]
