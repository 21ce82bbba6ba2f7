"""Box arithmetic on `(x1, y1, x2, y2)` pixel boxes: area, IoU, clipping, encode/decode.

The one place box formats are converted. Everything is float32, jit-able and shape-static.
"""
import math
from typing import Sequence, Tuple

import jax.numpy as jnp

from maskrcnn_jax.types import Array

# torchvision's `BoxCoder` clamp on dw/dh: never let exp() blow up.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes: Array) -> Array:
  """Areas `(x2 - x1) * (y2 - y1)` (no +1). boxes: [..., 4] (x1, y1, x2, y2). Returns [...]."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1: Array, boxes2: Array) -> Array:
  """IoU of every pair, as `torchvision.ops.box_iou`.

  Args:
    boxes1: [N, 4] (x1, y1, x2, y2).
    boxes2: [M, 4] (x1, y1, x2, y2).

  Returns:
    [N, M] float32. A pair whose union is 0 (two empty boxes) gets 0, not NaN.
  """
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.clip(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1[:, None] + area2[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def clip_boxes(boxes: Array, height: Array, width: Array) -> Array:
  """Clips boxes to the image `[0, width] x [0, height]`, as `clip_boxes_to_image`.

  Args:
    boxes: [..., 4] (x1, y1, x2, y2) pixels.
    height, width: scalars (may be traced: the un-padded image size).
  """
  x = jnp.clip(boxes[..., 0::2], 0.0, width)
  y = jnp.clip(boxes[..., 1::2], 0.0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def box_sizes_at_least(boxes: Array, min_size: float) -> Array:
  """True where width and height are both >= min_size, as `remove_small_boxes`. boxes: [..., 4]."""
  return (((boxes[..., 2] - boxes[..., 0]) >= min_size)
          & ((boxes[..., 3] - boxes[..., 1]) >= min_size))


def encode_boxes(boxes: Array, anchors: Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Array:
  """Regression targets of `boxes` relative to `anchors`, as torchvision's `BoxCoder.encode_single`.

  Args:
    boxes: [..., 4] (x1, y1, x2, y2) ground truth.
    anchors: [..., 4] (x1, y1, x2, y2) reference boxes (anchors or proposals), positive size.
    weights: (wx, wy, ww, wh).

  Returns:
    [..., 4] (dx, dy, dw, dh) float32.
  """
  wx, wy, ww, wh = weights
  aw = anchors[..., 2] - anchors[..., 0]
  ah = anchors[..., 3] - anchors[..., 1]
  ax = anchors[..., 0] + 0.5 * aw
  ay = anchors[..., 1] + 0.5 * ah
  gw = boxes[..., 2] - boxes[..., 0]
  gh = boxes[..., 3] - boxes[..., 1]
  gx = boxes[..., 0] + 0.5 * gw
  gy = boxes[..., 1] + 0.5 * gh
  return jnp.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                    ww * jnp.log(gw / aw), wh * jnp.log(gh / ah)], axis=-1)


def decode_boxes(deltas: Array, anchors: Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = BBOX_XFORM_CLIP) -> Array:
  """Applies regression deltas to reference boxes, as torchvision's `BoxCoder.decode_single`.

  Args:
    deltas: [..., 4] (dx, dy, dw, dh); broadcastable against anchors (e.g. [N, K, 4] with [N, 1,
    4]).
    anchors: [..., 4] (x1, y1, x2, y2).
    weights: (wx, wy, ww, wh).
    clip: upper clamp of dw/dh after dividing by the weights (log(1000/16)).

  Returns:
    [..., 4] (x1, y1, x2, y2) float32.
  """
  deltas = deltas.astype(jnp.float32)
  anchors = anchors.astype(jnp.float32)
  wx, wy, ww, wh = weights
  widths = anchors[..., 2] - anchors[..., 0]
  heights = anchors[..., 3] - anchors[..., 1]
  ctr_x = anchors[..., 0] + 0.5 * widths
  ctr_y = anchors[..., 1] + 0.5 * heights
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clip)
  dh = jnp.minimum(deltas[..., 3] / wh, clip)
  pred_ctr_x = dx * widths + ctr_x
  pred_ctr_y = dy * heights + ctr_y
  half_w = 0.5 * (jnp.exp(dw) * widths)
  half_h = 0.5 * (jnp.exp(dh) * heights)
  return jnp.stack([pred_ctr_x - half_w, pred_ctr_y - half_h,
                    pred_ctr_x + half_w, pred_ctr_y + half_h], axis=-1)


def scale_boxes(boxes: Array, scale_yx: Tuple[Array, Array]) -> Array:
  """Multiplies x coordinates by scale_yx[1] and y by scale_yx[0]. boxes: [..., 4]."""
  sy, sx = scale_yx
  return boxes * jnp.stack([sx, sy, sx, sy]).astype(boxes.dtype)
