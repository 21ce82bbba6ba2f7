"""Balanced positive/negative sampling with a static number of samples."""
from typing import Tuple

import jax
import jax.numpy as jnp

from maskrcnn_jax.types import Array


def _first_k_random(key: Array, mask: Array, k: Array, max_k: int) -> Array:
  """[n] bool: the True entries of `mask` that come first, at most `k` of them, in a uniformly
  random order of the True entries (ties in the random keys broken by index, as a stable sort).

  A top-k threshold instead of a full sort and an inverse permutation (a scatter): the first k of
  `lax.top_k` (values descending, equal values lower index first) are exactly the entries above
  the k-th one's (value, index). `k` may be traced; `max_k` is its static bound.
  """
  n = mask.shape[0]
  score = jnp.where(mask, -jax.random.uniform(key, (n,)), -2.0)  # higher score: earlier
  m = max(1, min(int(max_k), n))
  top, idx = jax.lax.top_k(score, m)
  last = jnp.clip(k, 1, m) - 1
  t_val, t_idx = top[last], idx[last]
  index = jnp.arange(n, dtype=idx.dtype)
  first = (score > t_val) | ((score == t_val) & (index <= t_idx))
  return mask & first & (k > 0)


def sample_balanced(key: Array, positive: Array, negative: Array, num_samples: int,
                    positive_fraction: float) -> Tuple[Array, Array]:
  """torchvision's `BalancedPositiveNegativeSampler` for one image, as masks.

  Takes min(#positives, int(num_samples * positive_fraction)) random positives and fills up to
  `num_samples` with random negatives (fewer when there are not enough).

  Args:
    key: PRNG key.
    positive: [A] bool candidates labelled positive.
    negative: [A] bool candidates labelled negative (disjoint from positive).
    num_samples: static total per image (256 anchors, 512 RoIs).
    positive_fraction: static cap on the positive share.

  Returns:
    sampled_positive, sampled_negative: [A] bool masks.
  """
  kp, kn = jax.random.split(key)
  max_pos = int(num_samples * positive_fraction)
  pos = _first_k_random(kp, positive, jnp.int32(max_pos), max_pos)
  num_neg = num_samples - jnp.sum(pos, dtype=jnp.int32)
  neg = _first_k_random(kn, negative, num_neg, num_samples)
  return pos, neg


def sample_indices(key: Array, positive: Array, negative: Array, num_samples: int,
                   positive_fraction: float) -> Tuple[Array, Array, Array]:
  """`sample_balanced`, returned as exactly `num_samples` indices, sampled positives first.

  Returns:
    indices: [num_samples] int32 into the candidates.
    is_positive: [num_samples] bool.
    valid: [num_samples] bool (False on slots left empty when candidates run out).
  """
  pos, neg = sample_balanced(key, positive, negative, num_samples, positive_fraction)
  # Positives first, then negatives, each in index order (lax.top_k puts equal values in index
  # order): a partial sort, no scatter.
  priority = jnp.where(pos, 2, jnp.where(neg, 1, 0)).astype(jnp.int32)
  _, order = jax.lax.top_k(priority, min(num_samples, priority.shape[0]))
  order = order.astype(jnp.int32)
  is_pos, valid = pos[order], (pos | neg)[order]
  short = num_samples - order.shape[0]  # fewer candidates than samples: empty slots
  if short > 0:
    order = jnp.pad(order, (0, short))
    is_pos, valid = jnp.pad(is_pos, (0, short)), jnp.pad(valid, (0, short))
  return order, is_pos, valid
