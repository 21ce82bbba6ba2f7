"""The training loop: `train_and_evaluate(config, workdir)`.

WORKDIR/
  config.json        the config of the run (checked against the config of a resumed run)
  checkpoints/<step> orbax checkpoints of the whole TrainState (see `checkpoint.py`)
  tensorboard/       scalars: train/<loss>, train/loss, train/grad_norm, train/learning_rate,
                     train/steps_per_sec, eval/<metric>

A workdir with checkpoints is resumed from the newest readable one: same step, parameters,
optimizer state and RNG, and the data pipeline skips the batches already used, so an interrupted
run ends with the same parameters as an uninterrupted one. SIGTERM (preemption) saves the current
step and returns normally.
"""
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from maskrcnn_jax import paths
from maskrcnn_jax.modeling.builder import build_model
from maskrcnn_jax.modeling.mask_rcnn import BOX_LOSSES
from maskrcnn_jax.training import (
    checkpoint as ckpt_lib,
    data_source,
    initialization,
    optimizer,
    parallel,
)
from maskrcnn_jax.training.errors import ConfigError
from maskrcnn_jax.training.train_state import TrainState

log = logging.getLogger(__name__)

# evaluate(step=, model=, variables=, builder=, workdir=) -> {name: float} or None
EvaluateFn = Callable[..., Optional[Mapping[str, float]]]
# hook(step, state, metrics, batch): called on every process after each step (and its checkpoint)
# with the new state, the step's metrics and this process's (numpy) batch.
Hook = Callable[[int, TrainState, Dict[str, float], Dict[str, Any]], None]


class NonFiniteError(FloatingPointError):
  """A loss or the gradient norm was NaN or infinite; that state was not saved."""


def check_finite(metrics: Mapping[str, Any], step: int, last_checkpoint: Optional[int] = None):
  """Raises NonFiniteError naming `step` and every non-finite loss / gradient norm."""
  bad = {k: float(v) for k, v in metrics.items()
         if (k.startswith("loss") or k == "grad_norm") and not np.isfinite(v)}
  if bad:
    values = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
    kept = (f"the last good checkpoint is step {last_checkpoint}" if last_checkpoint is not None
            else "no checkpoint was written")
    raise NonFiniteError(f"non-finite training values at step {step}: {values}; this state was "
                         f"not saved ({kept}). Lower training.learning_rate, set "
                         "training.clip_grad_norm, or check the data.")


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the current step and stops."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    """Whether any process was asked to stop (all processes must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


def progress_line(step: int, total: int, steps_per_sec: float, metrics: Mapping[str, float]):
  """'step 20/100 | 2.31 steps/s | ETA 0:00:35 | loss 1.2345 | loss_objectness ... | lr ...'."""
  eta = (total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
  parts = [f"step {step}/{total}", f"{steps_per_sec:.2f} steps/s", f"ETA {_format_duration(eta)}",
           f"loss {metrics['loss']:.4f}"]
  losses = [k for k in BOX_LOSSES if k in metrics]
  losses += sorted(k for k in metrics if k.startswith("loss_") and k not in BOX_LOSSES)
  parts += [f"{k} {metrics[k]:.4f}" for k in losses]
  parts += [f"grad_norm {metrics['grad_norm']:.3g}", f"lr {metrics['learning_rate']:.3g}"]
  return " | ".join(parts)


def _config_dict(config) -> Dict[str, Any]:
  return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
      else json.loads(json.dumps(dict(config), default=str))


def _diff(old, new, prefix=""):
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _write_config(config, workdir: str):
  """Writes WORKDIR/config.json; on resume, logs what changed since the last run."""
  path = paths.as_path(workdir) / "config.json"
  cfg = _config_dict(config)
  if path.exists():
    try:
      old = json.loads(path.read_text())
      changes = _diff(old, cfg)
      if changes:
        log.warning("the config differs from the one in %s: %s", path, "; ".join(changes[:20]))
    except (OSError, ValueError):
      pass
  if jax.process_index() == 0:
    paths.write_text_atomic(path, json.dumps(cfg, indent=2, sort_keys=True))


def _enable_compilation_cache(training):
  cache = training.get("compilation_cache_dir", "")
  if cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class SummaryWriter:
  """TensorBoard scalars, on process 0 only.

  Written with TF's core `tf.summary.write` and the scalars plugin's metadata, which is what
  `tf.summary.scalar` does, without needing the tensorboard package installed.
  """

  def __init__(self, logdir: Optional[str]):
    self._writer = None
    if logdir and jax.process_index() == 0:
      import tensorflow as tf
      from tensorflow.core.framework import summary_pb2
      self._tf = tf
      self._metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
          data_class=summary_pb2.DATA_CLASS_SCALAR)
      self._writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: Mapping[str, float], prefix: str):
    if self._writer is None:
      return
    with self._writer.as_default(step=step):
      for k, v in values.items():
        self._tf.summary.write(f"{prefix}/{k}", self._tf.constant(float(v), self._tf.float32),
                               metadata=self._metadata)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()


_KNOWN = {
    "training": {"steps", "batch_size", "learning_rate", "momentum", "weight_decay",
                 "weight_decay_norm_and_bias", "schedule", "decay_steps", "decay_factor",
                 "min_lr_factor", "warmup_steps", "warmup_factor", "clip_grad_norm",
                 "frozen_stages", "seed", "log_every", "checkpoint_every", "keep_checkpoints",
                 "eval_every", "async_checkpointing", "compilation_cache_dir", "distributed"},
    "training.distributed": {"enabled", "coordinator_address", "num_processes", "process_id",
                             "local_device_ids", "cpu_collectives"},
    "data": set(data_source.DATA_KEYS),
    "data.shapes": set(data_source.SHAPES_KEYS),
    "data.keypoint_shapes": set(data_source.KEYPOINT_SHAPES_KEYS),
    "init": {"torchvision_checkpoint", "imagenet_resnet"},
}


def validate_config(config):
  """Unknown keys in the training, data and init sections are errors (typos would otherwise be
  silently ignored); `config.model` is checked by `build_model`."""
  for section, known in _KNOWN.items():
    node = config
    for part in section.split("."):
      node = node.get(part) if node is not None else None
    if node is None:
      if section in ("training", "data"):
        raise ConfigError(f"the config has no '{section}' section (see configs/base.py)")
      continue
    unknown = set(node.keys()) - known
    if unknown:
      raise ConfigError(f"config.{section} has unknown keys {sorted(unknown)}; known: "
                        f"{sorted(known)}")
  data_source.validate(config.data)
  for key, path in dict(config.get("init", {}) or {}).items():
    if path and not os.path.isfile(os.path.expanduser(path)):
      raise ConfigError(f"config.init.{key}={path!r}: no such file")


def model_from_config(config):
  """`build_model(config.model)` for training (the backbone's frozen stages keep their batch-norm
  statistics); a config it cannot build is a ConfigError naming the key."""
  try:
    return build_model(config.model,
                       frozen_stages=int(config.training.get("frozen_stages", 0)))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_batch(training) -> int:
  """The per-process batch size; the global one must split evenly over processes and devices."""
  global_batch = int(training.batch_size)
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if global_batch % n_dev:
    raise ConfigError(f"training.batch_size={global_batch} (global) must be a multiple of the "
                      f"device count {n_dev}")
  return global_batch // n_proc


def abstract_train_state(model, tx_fn, mesh) -> TrainState:
  """The TrainState's shapes, dtypes and (replicated) shardings, without computing anything."""
  def make():
    variables = initialization.random_variables(model, 0)
    return TrainState.create(variables, tx_fn(variables["params"]))
  shapes = jax.eval_shape(make)
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def abstract_inference_state(model, mesh) -> Dict[str, Any]:
  """{'step', 'params', 'batch_stats'}: the part of a TrainState inference restores (no optimizer
  state is built or read), as shapes with replicated shardings."""
  shapes = jax.eval_shape(lambda: initialization.random_variables(model, 0))
  shapes = {"step": jax.ShapeDtypeStruct((), np.int32), **shapes}
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _check_batch_keys(model, batch) -> None:
  """Raises ConfigError unless the input pipeline gives every entry the model's losses read (its
  heads' `batch_keys`; crowd regions are optional), keypoints with the keypoint head's count."""
  missing = [k for k in model.batch_keys if k not in batch and not k.startswith("crowd_")]
  if "gt_keypoints" in missing:
    raise ConfigError("the model has a keypoint head (config.model.keypoint_head) but the "
                      "dataset has no keypoints: use COCO person_keypoints annotations "
                      "(config.data.annotations='person_keypoints') or the synthetic "
                      "config.data.dataset='keypoint_shapes'")
  if missing:
    raise ConfigError(f"the input pipeline gives no {missing}, which the model's heads read in "
                      f"training (it gives {sorted(batch)}; see data/pipeline.py OUTPUT_KEYS)")
  head = model.head("keypoint_head")
  if head is not None and tuple(batch["gt_keypoints"].shape[-2:]) != (head.num_keypoints, 3):
    raise ConfigError(f"the dataset's keypoints are {tuple(batch['gt_keypoints'].shape[-2:])} "
                      f"(K, 3) per object, but config.model.keypoint_head.num_keypoints="
                      f"{head.num_keypoints}: set it to the dataset's K")


def train_and_evaluate(config, workdir: str, *, evaluate: Optional[EvaluateFn] = None,
                       hooks: Iterable[Hook] = ()) -> TrainState:
  """Trains `config` in `workdir` (resuming it if it holds checkpoints); returns the final state.

  Args:
    config: an ml_collections ConfigDict with `model`, `training`, `data` and `init` sections (see
      configs/base.py).
    workdir: output folder (created if needed).
    evaluate: optional callback, called on every process every `training.eval_every` steps and at
      the end as `evaluate(step=, model=, variables=, builder=, workdir=)`; a returned mapping of
      floats goes to TensorBoard under 'eval/' and to the console.
    hooks: callables `hook(step, state, metrics, batch)` run after each step (after its
      checkpoint was started), e.g. for profiling or tests; `batch` is this process's numpy batch.

  Raises:
    NonFiniteError: a loss or the gradient norm stopped being finite (nothing of it is saved).
    checkpoint.CheckpointMismatchError: the workdir's checkpoint does not fit the config.
  """
  validate_config(config)
  model = model_from_config(config)  # touches no device: before jax.distributed
  training = config.training
  parallel.maybe_initialize_distributed(training)
  _enable_compilation_cache(training)
  workdir = paths.resolve(workdir)  # a gs:// URL stays one
  paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  _write_config(config, workdir)
  is_main = jax.process_index() == 0
  say = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)

  mesh = parallel.make_mesh()
  per_process_batch = _check_batch(training)
  total_steps = int(training.steps)
  tx_fn = lambda params: optimizer.make_optimizer(training, params)
  abstract = abstract_train_state(model, tx_fn, mesh)
  tx = tx_fn(abstract.params)

  checkpointer = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"),
                                       keep=int(training.get("keep_checkpoints", 3)),
                                       async_save=bool(training.get("async_checkpointing", True)))
  preemption = _Preemption().__enter__()  # SIGTERM from here on stops at the next step boundary
  try:
    state, restored_step = checkpointer.restore_latest(abstract)
    if state is None:
      init_cfg = config.get("init", {})
      if int(training.get("frozen_stages", 0)) > 0 and not any(dict(init_cfg or {}).values()):
        log.warning("training.frozen_stages=%d freezes randomly initialized layers (no "
                    "config.init weights given); use frozen_stages=0 to train from scratch",
                    int(training.frozen_stages))
      variables = initialization.initial_variables(model, init_cfg, int(training.get("seed", 0)))
      variables.pop("init_report", None)
      if jax.process_count() > 1:  # every process must start from the very same values
        variables = multihost_utils.broadcast_one_to_all(jax.device_get(variables))
      state = parallel.replicate(
          TrainState.create(variables, tx, seed=int(training.get("seed", 0))), mesh)
      start = 0
      say(f"training from scratch in {workdir}: {total_steps} steps, global batch "
          f"{int(training.batch_size)} over {jax.device_count()} device(s) and "
          f"{jax.process_count()} process(es)")
    else:
      start = int(restored_step)
      say(f"resumed {workdir} from step {start} ({checkpointer.path(start)})")

    builder = data_source.prepare_builder(config.data)
    data_seed = int(config.data.get("seed", training.get("seed", 0)))
    batches = data_source.train_iterator(builder, config.data, per_process_batch, start,
                                         data_seed)
    step_fn = parallel.make_parallel_step(
        parallel.make_train_step(model, tx, optimizer.learning_rate_schedule(training),
                                 optimizer.trainable_mask(abstract.params,
                                                          training.get("frozen_stages", 0))),
        mesh)
    writer = SummaryWriter(paths.join(workdir, "tensorboard"))
    log_every = max(1, int(training.get("log_every", 10)))
    ckpt_every = int(training.get("checkpoint_every", 1000))
    eval_every = int(training.get("eval_every", 0))
    last_saved = restored_step
    hooks = list(hooks)

    def run_evaluate(step):
      if evaluate is None:
        return
      results = evaluate(step=step, model=model, variables=state.variables, builder=builder,
                         workdir=workdir)
      if results:
        writer.scalars(step, results, "eval")
        say(f"eval at step {step}: " + ", ".join(f"{k} {float(v):.4f}"
                                                  for k, v in sorted(results.items())))

    # The host does not wait for the device after each step: the step's metrics stay on the
    # device (pending) while the next batch is read and put on the device, and are fetched
    # together every log_every steps and before anything is saved or evaluated, when each
    # step's losses and gradient norm are checked (check_finite), so a non-finite state is never
    # saved. steps/s are over the steps since the last progress line (the first step, which
    # compiles, and evaluations are left out).
    pending = []  # (step, device metrics) not fetched yet
    latest = {}  # the newest fetched step's metrics (host floats)

    def fetch_metrics():
      """Fetches and checks the pending steps' metrics; returns the newest step's."""
      fetched = parallel.to_host([m for _, m in pending])
      for (s, _), m in zip(pending, fetched):
        latest.clear()
        latest.update({k: float(v) for k, v in m.items()})
        check_finite(latest, s, last_saved)
      pending.clear()
      return dict(latest)

    window_start, window_steps = time.time(), 0
    step = start
    if step < total_steps:
      next_batch = next(batches)
      _check_batch_keys(model, next_batch)
      next_device = parallel.global_batch(next_batch, mesh, model.batch_keys)
    while step < total_steps:
      local_batch, device_batch = next_batch, next_device
      t = time.time()
      state, metrics = step_fn(state, device_batch)  # dispatched; runs while the host goes on
      step += 1
      pending.append((step, metrics))
      if step < total_steps:  # the next batch, read and sent while this step runs
        next_batch = next(batches)
        next_device = parallel.global_batch(next_batch, mesh, model.batch_keys)
      if step == start + 1:
        fetch_metrics()
        say(f"first step (with compilation) took {time.time() - t:.1f}s")
        window_start, window_steps = time.time(), 0
      else:
        window_steps += 1
      save_now = (ckpt_every > 0 and step % ckpt_every == 0) or step == total_steps
      evaluate_now = eval_every > 0 and (step % eval_every == 0 or step == total_steps)
      if step % log_every == 0 or save_now or evaluate_now:
        host = fetch_metrics()
      if step % log_every == 0 or step == total_steps:
        elapsed = time.time() - window_start
        rate = window_steps / elapsed if elapsed > 0 and window_steps else 0.0
        say(progress_line(step, total_steps, rate, host))
        writer.scalars(step, dict(host, steps_per_sec=rate), "train")
        window_start, window_steps = time.time(), 0
      saved = False
      if save_now:
        saved = checkpointer.save(step, state)
        last_saved = step
      for hook in hooks:  # metrics as device arrays (float() fetches one)
        hook(step, state, metrics, local_batch)
      if evaluate_now:
        run_evaluate(step)
        window_start, window_steps = time.time(), 0
      if preemption.any_process():
        if not saved:
          fetch_metrics()  # a non-finite state is not saved
          checkpointer.save(step, state)
        checkpointer.wait()
        say(f"preempted (SIGTERM): saved step {step} in {checkpointer.path(step)}; rerun the "
            "same command to resume")
        break
    writer.flush()
    checkpointer.wait()
    return state
  finally:
    preemption.__exit__(None, None, None)
    checkpointer.close()
