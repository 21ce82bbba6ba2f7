"""Indexing in the form accelerators like: a one-hot select-and-sum instead of a gather.

`jnp.take_along_axis` is a gather whose gradient is a scatter-add (serialized or atomic on TPU
and GPU, and slow under `vmap` in deterministic mode). Picking one entry per row along a short
axis (a class, a keypoint cell) is instead a comparison with an iota, a select and a sum, whose
gradient is a select: dense, elementwise, no scatter. The value is exact (the sum of one entry
and zeros), for any finite or infinite entry (a select, not a multiplication by the one-hot).
"""
import jax.numpy as jnp

from maskrcnn_jax.types import Array


def take_one_hot(x: Array, index: Array, axis: int = -1) -> Array:
  """`x` at `index` along `axis`: `jnp.take_along_axis(x, expand_dims(index, axis), axis)`
  without the axis, with a scatter-free gradient.

  Args:
    x: [..., K, ...] any float dtype.
    index: int array broadcastable to x's shape without `axis`, values in [0, K); an index outside
      that range picks 0 (take_along_axis would clamp or fill).
    axis: the axis of x to pick along.

  Returns:
    x's shape without `axis`, x's dtype.
  """
  axis = axis % x.ndim
  k = x.shape[axis]
  shape = [1] * x.ndim
  shape[axis] = k
  iota = jnp.arange(k, dtype=jnp.int32).reshape(shape)
  hit = jnp.expand_dims(jnp.asarray(index, jnp.int32), axis) == iota
  return jnp.sum(jnp.where(hit, x, jnp.zeros((), x.dtype)), axis=axis)
