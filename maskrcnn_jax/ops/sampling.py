"""Balanced positive/negative sampling with a static number of samples."""
from typing import Tuple

import jax
import jax.numpy as jnp

from maskrcnn_jax.types import Array


def _random_rank(key: Array, mask: Array) -> Array:
  """Rank of each True entry in a uniformly random order of the True entries (False ones: n)."""
  n = mask.shape[0]
  keys = jnp.where(mask, jax.random.uniform(key, (n,)), 2.0)
  order = jnp.argsort(keys)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return jnp.where(mask, rank, n)


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
  pos = positive & (_random_rank(kp, positive) < max_pos)
  num_neg = num_samples - jnp.sum(pos)
  neg = negative & (_random_rank(kn, negative) < num_neg)
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
  # Positives first, then negatives, each in index order; stable for reproducibility.
  priority = jnp.where(pos, 2, jnp.where(neg, 1, 0))
  order = jnp.argsort(-priority, stable=True)[:num_samples].astype(jnp.int32)
  is_pos, valid = pos[order], (pos | neg)[order]
  short = num_samples - order.shape[0]  # fewer candidates than samples: empty slots
  if short > 0:
    order = jnp.pad(order, (0, short))
    is_pos, valid = jnp.pad(is_pos, (0, short)), jnp.pad(valid, (0, short))
  return order, is_pos, valid
