"""The training state: everything a checkpoint must hold to continue a run bit for bit."""
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
  """A pytree of arrays (no callables), so orbax saves and restores it as is.

  Attributes:
    step: [] int32, optimizer updates done so far (also the number of batches consumed).
    params: the model's 'params' collection (float32, whatever the compute dtype).
    batch_stats: the norms' statistics ('batch_stats'): frozen BatchNorm's fixed terms, and the
      running statistics of batch-statistics BatchNorm ('bn'), updated by each train step.
    opt_state: the optax state of `optimizer.make_optimizer(...)`.
    rng: [2] uint32 raw key data (`jax.random.key_data`) of the sampling key; the key of each step
      and example is derived from it (see `parallel.example_keys`), so it never changes.
  """
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray

  @classmethod
  def create(cls, variables, tx, seed: int = 0) -> "TrainState":
    """A step-0 state from `{'params', 'batch_stats'}` and an optax transformation."""
    params = variables["params"]
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
               rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))

  @property
  def variables(self):
    """`{'params', 'batch_stats'}` for `model.apply`."""
    return {"params": self.params, "batch_stats": self.batch_stats}
