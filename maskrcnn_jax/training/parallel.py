"""Data parallelism: one mesh axis 'data', a pure per-device step, `lax.pmean` of gradients.

    maybe_initialize_distributed(config.training)    # first, before any other jax call
    mesh = make_mesh()
    step_fn = make_parallel_step(make_train_step(model, tx, ...), mesh)
    state = replicate(state, mesh)
    state, metrics = step_fn(state, global_batch(local_batch, mesh))

The global batch is split along its leading axis over all devices of all processes; each process
feeds its own part (`make_dataset(..., process_index, process_count)`) and `global_batch` assembles
the global array with `jax.make_array_from_process_local_data`.

Sampling randomness (the RPN's anchor sampler and the RoI sampler) is a key per example,
`fold_in(fold_in(rng, step), global example index)`, where the global index of local example j on
device d is `d * per_device_batch + j`, passed to the model's loss with the device's batch. The
losses are per-image means and batch-statistics norms reduce over the data axis (SyncBatchNorm), so
samples, losses, gradients and running statistics are the same whatever the number of devices or
processes the global batch is split over: a step on 8 devices equals a step on 1 device over the
same 8 images (up to float summation order).
"""
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from maskrcnn_jax.training.train_state import TrainState

AXIS = "data"

_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


def maybe_initialize_distributed(training: Mapping[str, Any]) -> bool:
  """Calls `jax.distributed.initialize` when `training.distributed.enabled` is set.

  Each of coordinator_address ('host:port'), num_processes and process_id comes from
  `training.distributed` when set there (non-empty / >= 0), else from the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, else is left to jax's cluster
  auto-detection (TPU pods, SLURM, ...). CPU processes talk through gloo collectives. Must run
  before anything touches a jax device. Returns whether it initialized.
  """
  dist = dict(training.get("distributed", {}) or {})
  if not dist.get("enabled", False):
    return False
  kwargs = {}
  for key, env in _ENV.items():
    value = dist.get(key)
    if value in (None, "", -1):
      value = os.environ.get(env)
    if value not in (None, ""):
      kwargs[key] = value if key == "coordinator_address" else int(value)
  if dist.get("local_device_ids"):
    kwargs["local_device_ids"] = [int(i) for i in dist["local_device_ids"]]
  # Only affects the CPU backend: without it CPU collectives across processes are unavailable.
  jax.config.update("jax_cpu_collectives_implementation", dist.get("cpu_collectives", "gloo"))
  jax.distributed.initialize(**kwargs)
  return True


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh ('data',) over `devices` (default: every device of every process)."""
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (AXIS,))
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def example_keys(rng, step, global_index):
  """Sampling keys of the examples of one step.

  Args:
    rng: [2] uint32 key data (`TrainState.rng`).
    step: [] int32 update count.
    global_index: [b] int32 index of each example in the global batch.

  Returns:
    [b] typed PRNG keys.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(global_index)


def make_train_step(model, tx: optax.GradientTransformation, learning_rate: Callable,
                    trainable: Optional[Any] = None, axis_name: str = AXIS):
  """The pure per-device step `train_step(state, batch) -> (state, metrics)`.

  Must run where `axis_name` is bound (inside `make_parallel_step`'s shard_map).

  Args:
    model: a `MaskRCNN`.
    tx: from `optimizer.make_optimizer`.
    learning_rate: the schedule, t -> lr (for the metrics only).
    trainable: params-shaped tree of bools, the leaves counted in 'grad_norm' (default all).
    axis_name: the mesh axis the batch is split over.

  `batch` holds this device's examples, the model's `batch_keys` (image [b, H, W, 3], image_size
  [b, 2], gt_boxes [b, M, 4], gt_classes [b, M], gt_valid [b, M], crowd_boxes [b, Mc, 4],
  crowd_valid [b, Mc], and the heads' entries such as gt_masks [b, M, S, S]). The model's
  `losses` runs once on it (batch-statistics norms need the whole batch). `metrics` are global
  means: every `loss_*`, 'loss' (the objective: their sum, weighted by the model's loss_weights),
  'num_fg_rois', 'grad_norm' (global norm of the averaged gradients of trained parameters, before
  clipping) and 'learning_rate' (of this update); all float32 and identical on every device. The
  state's batch_stats take the running statistics the model updated.
  """

  def losses(params, batch_stats, batch, keys):
    out, updated = model.apply({"params": params, "batch_stats": batch_stats}, batch, keys,
                               axis_name, method=model.losses, mutable=["batch_stats"])
    out = {k: v.astype(jnp.float32) for k, v in out.items()}
    return model.objective(out), (out, updated.get("batch_stats", batch_stats))

  def train_step(state: TrainState, batch: Dict[str, jnp.ndarray]):
    b = batch["image"].shape[0]
    index = lax.axis_index(axis_name) * b + jnp.arange(b, dtype=jnp.int32)
    keys = example_keys(state.rng, state.step, index)
    # Differentiate the trained leaves only: frozen stages get no weight gradients at all (not
    # computed and then dropped), and only the trained gradients are averaged over devices.
    trained, frozen = _split(state.params, trainable)

    def trained_losses(trained, batch_stats, batch, keys):
      return losses(_merge(trained, frozen), batch_stats, batch, keys)

    (total, (metrics, batch_stats)), grads = jax.value_and_grad(trained_losses, has_aux=True)(
        trained, state.batch_stats, batch, keys)
    grads = _merge(lax.pmean(grads, axis_name), jax.tree.map(jnp.zeros_like, frozen))
    metrics = lax.pmean(dict(metrics, loss=total), axis_name)
    counted = grads if trainable is None else jax.tree.map(
        lambda g, t: g if t else jnp.zeros((), g.dtype), grads, trainable)
    metrics["grad_norm"] = optax.tree.norm(counted).astype(jnp.float32)
    metrics["learning_rate"] = jnp.asarray(learning_rate(state.step), jnp.float32)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         batch_stats=batch_stats), metrics

  return train_step


def _split(params, trainable):
  """(trained leaves, frozen leaves) of `params` as two flat {path: leaf} dicts (all trained when
  `trainable` is None)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  if trainable is None:
    return flat, {}
  mask = traverse_util.flatten_dict(trainable, sep="/")
  return ({k: v for k, v in flat.items() if mask[k]},
          {k: v for k, v in flat.items() if not mask[k]})


def _merge(trained, frozen):
  """Inverse of `_split`: the params tree."""
  return traverse_util.unflatten_dict({**trained, **frozen}, sep="/")


def make_parallel_step(train_step: Callable, mesh: jax.sharding.Mesh):
  """`train_step` over all devices: state replicated, batch split along its leading axis.

  jit(shard_map(train_step)) with the state donated: the returned function takes a replicated
  TrainState and a global batch (`global_batch`) and returns the new state and the metrics.
  """
  # check_vma=False: the model's while loops (NMS) start from device-invariant carries that the
  # batch makes device-varying, which the vma type check rejects; the outputs are pmean-ed, so
  # they are replicated as out_specs=P() promises.
  sharded = jax.shard_map(train_step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh):
  """Host values (identical on every process) -> arrays replicated over the mesh."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, jax.device_get(tree))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh,
                 keys: Sequence[str]) -> Dict[str, jax.Array]:
  """This process's batch -> global arrays split over the mesh's 'data' axis.

  Only `keys` (the model's `batch_keys`) go to the devices; those the batch lacks are left out
  (the model names what it needs and misses). The local batch size must be a multiple of this
  process's device count; the global batch is the processes' batches concatenated in process
  order.
  """
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
          for k in keys if k in local_batch}


def to_host(tree):
  """Replicated (e.g. metrics or state) global arrays -> numpy, on any process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)
