"""Matching anchors or proposals to ground truth, as torchvision's `Matcher`, with static shapes."""
import enum
from typing import Tuple

import jax.numpy as jnp

from maskrcnn_jax.ops.boxes import pairwise_iou
from maskrcnn_jax.types import Array


class MatchLabel(enum.IntEnum):
  """What a candidate box is for training: background, ignored, or an object."""
  NEGATIVE = 0
  IGNORE = -1
  POSITIVE = 1


def match_boxes(boxes: Array, gt_boxes: Array, gt_valid: Array, high: float, low: float,
                allow_low_quality_matches: bool) -> Tuple[Array, Array]:
  """Matches each box to its best ground truth, as `torchvision...Matcher`.

  IoU >= high: POSITIVE; IoU < low: NEGATIVE; in between: IGNORE. With low-quality matches, every
  box that ties for a ground truth's best IoU is POSITIVE for its own best ground truth, even below
  `high` (torchvision's rule; ground truths whose best IoU is 0 take no part, so a box that overlaps
  nothing never becomes positive).

  Args:
    boxes: [A, 4] (x1, y1, x2, y2) anchors or proposals.
    gt_boxes: [M, 4] (x1, y1, x2, y2).
    gt_valid: [M] bool; padding rows never match.
    high, low: IoU thresholds.
    allow_low_quality_matches: torchvision's flag (True for the RPN, False for the box head).

  Returns:
    matched: [A] int32 index of each box's best valid ground truth (0 when there is none: read it
      only where the label is POSITIVE).
    labels: [A] int32 `MatchLabel` values; all NEGATIVE when no ground truth is valid.
  """
  iou = jnp.where(gt_valid[:, None], pairwise_iou(gt_boxes, boxes), -1.0)  # [M, A]
  matched = jnp.argmax(iou, axis=0).astype(jnp.int32)
  best = jnp.max(iou, axis=0)
  labels = jnp.where(best >= high, MatchLabel.POSITIVE,
                     jnp.where(best < low, MatchLabel.NEGATIVE, MatchLabel.IGNORE))
  if allow_low_quality_matches:
    best_per_gt = jnp.max(iou, axis=1, keepdims=True)  # [M, 1]
    ties = (iou == best_per_gt) & (best_per_gt > 0) & gt_valid[:, None]
    labels = jnp.where(jnp.any(ties, axis=0), MatchLabel.POSITIVE, labels)
  return matched, labels.astype(jnp.int32)


def crowd_overlap(boxes: Array, crowd_boxes: Array, crowd_valid: Array) -> Array:
  """Largest fraction of each box's area covered by a crowd region (intersection over box area).

  Args:
    boxes: [A, 4] (x1, y1, x2, y2); crowd_boxes: [C, 4]; crowd_valid: [C] bool.

  Returns:
    [A] float32 in [0, 1]; 0 when there is no valid crowd region.
  """
  if crowd_boxes.shape[0] == 0:
    return jnp.zeros(boxes.shape[:1], jnp.float32)
  lt = jnp.maximum(boxes[:, None, :2], crowd_boxes[None, :, :2])
  rb = jnp.minimum(boxes[:, None, 2:], crowd_boxes[None, :, 2:])
  wh = jnp.clip(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  ioa = jnp.where(area[:, None] > 0, inter / jnp.maximum(area[:, None], 1e-12), 0.0)
  return jnp.max(jnp.where(crowd_valid[None, :], ioa, 0.0), axis=1)
