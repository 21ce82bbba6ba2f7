"""The production programs of a config, for the benchmark scripts: the training step train.py runs
and the forward pass `maskrcnn_jax.predict` runs, with abstract (shapes only: for lowering) or
concrete (random weights, synthetic batch: for timing) arguments."""
import importlib.util
from typing import Dict

import numpy as np


def load_config(path: str, canvas: int = 0):
  """A configs/*.py file's config; `canvas` > 0 sets a square `data.image_size`."""
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if canvas:
    config.data.image_size = (canvas, canvas)
  return config


def batch_shapes(config, model, batch: int) -> Dict:
  """{key: (shape, dtype)} of one device's training batch, as the data pipeline makes it."""
  d = config.data
  h, w = tuple(d.image_size)
  m, mc = int(d.get("max_instances", 100)), int(d.get("max_crowd_instances", 20))
  s = int(d.get("mask_crop_size", 112))
  k = int(config.model.get("keypoint_head", {}).get("num_keypoints", 17))
  shapes = dict(image=((batch, h, w, 3), np.dtype(d.get("image_dtype", "float32"))),
                image_size=((batch, 2), np.int32),
                gt_boxes=((batch, m, 4), np.float32), gt_classes=((batch, m), np.int32),
                gt_valid=((batch, m), bool), crowd_boxes=((batch, mc, 4), np.float32),
                crowd_valid=((batch, mc), bool),
                gt_masks=((batch, m, s, s), np.dtype(d.get("mask_dtype", "float32"))),
                gt_keypoints=((batch, m, k, 3), np.float32))
  missing = [key for key in model.batch_keys if key not in shapes]
  if missing:
    raise SystemExit(f"no shape known for batch keys {missing}")
  return {key: shapes[key] for key in model.batch_keys}


def synthetic_batch(config, model, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """A training batch of random images, each with 8 random boxes of its classes and elliptic
  masks (enough foreground for every head to work)."""
  rng = np.random.default_rng(seed)
  shapes = batch_shapes(config, model, batch)
  out = {k: np.zeros(s, dt) for k, (s, dt) in shapes.items()}
  h, w = shapes["image"][0][1:3]
  if out["image"].dtype == np.uint8:  # sent as uint8, normalized on the device
    out["image"] = rng.integers(0, 256, shapes["image"][0], dtype=np.uint8)
  else:
    out["image"] = rng.normal(size=shapes["image"][0]).astype(np.float32)
  out["image_size"][:] = (h, w)
  n = min(8, shapes["gt_boxes"][0][1])
  xy = rng.uniform(0, 0.6, (batch, n, 2)) * (w, h)
  wh = rng.uniform(0.1, 0.4, (batch, n, 2)) * (w, h)
  out["gt_boxes"][:, :n] = np.concatenate([xy, np.minimum(xy + wh, (w, h))], -1)
  out["gt_classes"][:, :n] = rng.integers(1, int(config.model.num_classes), (batch, n))
  out["gt_valid"][:, :n] = True
  if "gt_masks" in out:
    s = out["gt_masks"].shape[-1]
    yy, xx = np.mgrid[:s, :s] / (s - 1) * 2 - 1
    out["gt_masks"][:, :n] = (xx ** 2 + yy ** 2 <= 1).astype(out["gt_masks"].dtype)
  if "gt_keypoints" in out:
    k = out["gt_keypoints"].shape[2]
    box = out["gt_boxes"][:, :n, None, :]
    u = rng.uniform(0, 1, (batch, n, k, 2))
    out["gt_keypoints"][:, :n, :, 0] = box[..., 0] + u[..., 0] * (box[..., 2] - box[..., 0])
    out["gt_keypoints"][:, :n, :, 1] = box[..., 1] + u[..., 1] * (box[..., 3] - box[..., 1])
    out["gt_keypoints"][:, :n, :, 2] = 2
  return out


def train_step(config, batch: int, abstract: bool = False):
  """(the production step: jit(shard_map(train_step)) on one device, its arguments): `batch`
  images; abstract: ShapeDtypeStructs, else a random-init state and `synthetic_batch`."""
  import jax

  from maskrcnn_jax.training import optimizer, parallel, trainer
  from maskrcnn_jax.training.train_state import TrainState
  model = trainer.model_from_config(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  training = config.training
  tx_fn = lambda params: optimizer.make_optimizer(training, params)
  shapes = trainer.abstract_train_state(model, tx_fn, mesh)
  tx = tx_fn(shapes.params)
  step = parallel.make_parallel_step(
      parallel.make_train_step(model, tx, optimizer.learning_rate_schedule(training),
                               optimizer.trainable_mask(shapes.params,
                                                        int(training.get("frozen_stages", 0)))),
      mesh)
  if abstract:
    return step, (shapes, {k: jax.ShapeDtypeStruct(*v)
                           for k, v in batch_shapes(config, model, batch).items()})
  from maskrcnn_jax.training import initialization
  state = parallel.replicate(TrainState.create(initialization.random_variables(model, 0), tx),
                             mesh)
  data = parallel.global_batch(synthetic_batch(config, model, batch), mesh, model.batch_keys)
  return step, (state, data)


def forward(config, batch: int, abstract: bool = False):
  """(jitted forward of `predict`, its arguments): normalized images on the config's canvas."""
  import jax

  from maskrcnn_jax.evaluation import inference
  from maskrcnn_jax.modeling.builder import build_model
  from maskrcnn_jax.training import initialization
  model = build_model(config.model)
  h, w = tuple(config.data.image_size)
  fn = jax.jit(lambda v, im, s, p: inference._forward.__wrapped__(model, v, im, s, p))
  if abstract:
    variables = jax.eval_shape(lambda: initialization.random_variables(model, 0))
    sizes = jax.ShapeDtypeStruct((batch, 2), np.int32)
    return fn, (variables, jax.ShapeDtypeStruct((batch, h, w, 3), np.float32), sizes, sizes)
  variables = initialization.random_variables(model, 0)
  images = np.random.default_rng(0).normal(size=(batch, h, w, 3)).astype(np.float32)
  sizes = np.tile(np.asarray([h, w], np.int32), (batch, 1))
  return fn, (variables, images, sizes, sizes)
