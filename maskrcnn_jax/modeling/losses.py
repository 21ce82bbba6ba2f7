"""Mask R-CNN losses with torchvision's names and definitions, for one image with validity masks.

Each function normalizes within its image, as torchvision does for a batch of one; the model
averages images (so a data-parallel mean over devices equals the mean over the global batch).
"""
from typing import Mapping, Tuple

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.indexing import take_one_hot
from maskrcnn_jax.ops.masks import select_class_channel
from maskrcnn_jax.types import Array


def smooth_l1(x: Array, beta: float) -> Array:
  """Elementwise `F.smooth_l1_loss(reduction='none')` of the difference x."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def _bce_with_logits(logits: Array, targets: Array) -> Array:
  """Elementwise `F.binary_cross_entropy_with_logits` (numerically stable form)."""
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def rpn_loss(objectness: Array, deltas: Array, targets: Array, sampled_pos: Array,
             sampled_neg: Array, beta: float = 1.0 / 9) -> Tuple[Array, Array]:
  """torchvision's `RegionProposalNetwork.compute_loss` for one image.

  Args:
    objectness: [A] logits; deltas: [A, 4] predicted (dx, dy, dw, dh); targets: [A, 4] encoded
      matched ground truth (read on positives only).
    sampled_pos, sampled_neg: [A] bool sampled anchors.

  Returns:
    (loss_objectness: BCE mean over sampled anchors,
     loss_rpn_box_reg: smooth-L1 summed over sampled positives / number sampled).
  """
  objectness = objectness.astype(jnp.float32)
  sampled = sampled_pos | sampled_neg
  n = jnp.maximum(jnp.sum(sampled), 1).astype(jnp.float32)
  bce = _bce_with_logits(objectness, sampled_pos.astype(jnp.float32))
  loss_obj = jnp.sum(jnp.where(sampled, bce, 0.0)) / n
  # Mask before smooth_l1: unread targets may be non-finite (log(0) of an empty box), and a mask
  # applied after it would still send 0 * inf = NaN into the gradient.
  diff = jnp.where(sampled_pos[:, None], deltas.astype(jnp.float32) - targets, 0.0)
  loss_box = jnp.sum(smooth_l1(diff, beta)) / n
  return loss_obj, loss_box


def fastrcnn_loss(logits: Array, deltas: Array, labels: Array, targets: Array, valid: Array,
                  beta: float = 1.0 / 9) -> Tuple[Array, Array]:
  """torchvision's `fastrcnn_loss` for one image's sampled RoIs.

  Args:
    logits: [R, K] class logits; deltas: [R, K, 4] per-class deltas.
    labels: [R] int32 class per RoI (0 background).
    targets: [R, 4] encoded matched ground truth (read where labels > 0).
    valid: [R] bool sampled slots.

  Returns:
    (loss_classifier: cross-entropy mean over RoIs,
     loss_box_reg: smooth-L1 of the labelled class' deltas summed over positives / number of RoIs).
  """
  logits = logits.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -take_one_hot(logp, labels, axis=-1)
  loss_cls = jnp.sum(jnp.where(valid, ce, 0.0)) / n
  picked = take_one_hot(deltas.astype(jnp.float32), labels[:, None], axis=1)
  diff = jnp.where((valid & (labels > 0))[:, None], picked - targets, 0.0)  # as in rpn_loss
  loss_box = jnp.sum(smooth_l1(diff, beta)) / n
  return loss_cls, loss_box


def maskrcnn_loss(mask_logits: Array, labels: Array, targets: Array, valid: Array) -> Array:
  """torchvision's `maskrcnn_loss` for one image's positive RoIs: per-pixel sigmoid BCE on the
  ground-truth class' channel (`select_class_channel`), mean over all pixels of the valid RoIs (0
  when there are none).

  Args:
    mask_logits: [P, S, S, K] logits (K = 1: class-agnostic);
    labels: [P] int32 ground-truth classes;
    targets: [P, S, S] float in [0, 1]; valid: [P] bool.
  """
  picked = select_class_channel(mask_logits.astype(jnp.float32), labels)
  bce = jnp.mean(_bce_with_logits(picked, targets.astype(jnp.float32)), axis=(1, 2))
  return jnp.sum(jnp.where(valid, bce, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def maskrcnn_softmax_loss(mask_logits: Array, channels: Array, targets: Array,
                          valid: Array) -> Array:
  """The coupled per-pixel softmax mask loss (Mask R-CNN paper, Table 2b) for one image's positive
  RoIs: with p the softmax over the mask channels (channel 0 background), a RoI whose foreground
  channel is c and whose soft target is t costs -(t log p_c + (1 - t) log p_0) per pixel; mean over
  all pixels of the valid RoIs (0 when there are none), normalized as `maskrcnn_loss`.

  Args:
    mask_logits: [P, S, S, K] logits, K >= 2 (channel 0 background);
    channels: [P] int32 each RoI's foreground channel in 1..K-1 (its ground-truth class, or 1 for
      class-agnostic logits [P, S, S, 2] of (background, foreground));
    targets: [P, S, S] float in [0, 1]; valid: [P] bool.
  """
  if mask_logits.shape[-1] < 2:
    raise ValueError(f"mask_logits needs a background and a foreground channel, got shape "
                     f"{mask_logits.shape}")
  logp = jax.nn.log_softmax(mask_logits.astype(jnp.float32), axis=-1)
  t = targets.astype(jnp.float32)
  per_pixel = -(t * select_class_channel(logp, channels) + (1.0 - t) * logp[..., 0])
  per_roi = jnp.mean(per_pixel, axis=(1, 2))
  return jnp.sum(jnp.where(valid, per_roi, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(
      jnp.float32)


def objective(losses: Mapping[str, Array], weights: Mapping[str, float] = None) -> Array:
  """The training objective: the sum of every `loss_*` entry of `losses`, each times its weight in
  `weights` (1 where absent). Entries not named `loss_*` (metrics) do not count."""
  weights = dict(weights or {})
  terms = [jnp.asarray(v, jnp.float32) * float(weights.get(k, 1.0))
           for k, v in sorted(losses.items()) if k.startswith("loss_")]
  if not terms:
    raise ValueError(f"no loss_* entry among {sorted(losses)}")
  return sum(terms)


def keypoint_loss(heatmap_logits: Array, targets: Array, valid: Array) -> Array:
  """torchvision's `keypointrcnn_loss`: cross-entropy of each valid keypoint's heatmap (a softmax
  over its S^2 cells) against its target cell, averaged over every valid keypoint given (0 when
  there is none).

  Pass a whole batch's RoIs ([B, P, ...] flattened or not) to normalize as torchvision does, by
  the batch's count of valid keypoints (so an image with many labelled points weighs more); the
  training step passes one device's batch, and devices then average their losses.

  Args:
    heatmap_logits: [..., K, S, S] logits;
    targets: [..., K] int32 cell index y * S + x (`ops.keypoints.keypoints_to_heatmap`);
    valid: [..., K] bool.
  """
  lead = heatmap_logits.shape[:-2]
  if targets.shape != lead or valid.shape != lead:
    raise ValueError(f"targets {targets.shape} and valid {valid.shape} must be heatmap_logits' "
                     f"{heatmap_logits.shape} without the last two axes")
  logits = heatmap_logits.astype(jnp.float32).reshape(lead + (-1,))
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = take_one_hot(logp, targets, axis=-1)
  return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(
      jnp.float32)
