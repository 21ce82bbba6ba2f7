"""Box and mask branches on RoIs: pooler, TwoMLPHead + predictor, FCN mask head, postprocessing."""
from typing import Any, Dict, List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import ConvTranspose2x2, conv
from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops.anchors import feature_grid_size
from maskrcnn_jax.ops.nms import batched_nms
from maskrcnn_jax.ops.roi_align import multilevel_roi_align_batched

POOLER_TYPES = ("align",)


class RoIPooler(nn.Module):
  """Multi-level RoIAlign over P2..P5 (no parameters), as torchvision's `MultiScaleRoIAlign`."""
  pooler_type: str = "align"
  """'align' (RoIAlign); other variants are added here as switches."""
  box_output_size: int = 7
  """Pooled size for the box head."""
  mask_output_size: int = 14
  """Pooled size for the mask head."""
  sampling_ratio: int = 2
  """Bilinear samples per bin side (>= 1: static shapes)."""
  aligned: bool = False
  """Half-pixel offset (torchvision's Mask R-CNN uses False, Detectron2 True)."""
  canonical_scale: int = 224
  """Level mapping: a box of this sqrt(area) goes to `canonical_level`."""
  canonical_level: int = 4
  """Level mapping: the level of a canonical box."""

  def __call__(self, features: List[jnp.ndarray], boxes: jnp.ndarray, output_size: int,
               padded_sizes=None):
    """Pools RoI features.

    Args:
      features: [P2..P5] each [B, H_l, W_l, C].
      boxes: [B, N, 4] (x1, y1, x2, y2) input pixels.
      output_size: S.
      padded_sizes: [B, 2] int32 sizes each image is padded to (see `layers.mask_to_extent`), or
        None: the maps' borders are the canvas'.

    Returns:
      [B, N, S, S, C].
    """
    if self.pooler_type not in POOLER_TYPES:
      raise ValueError(f"pooler_type must be one of {POOLER_TYPES}, got {self.pooler_type!r}")
    levels = range(2, 2 + len(features))
    scales = [2.0 ** -l for l in levels]
    extents = None
    if padded_sizes is not None:
      extents = jnp.stack([feature_grid_size(padded_sizes.astype(jnp.int32), l) for l in levels],
                          axis=1)  # [B, L, 2]
    return multilevel_roi_align_batched(
        features, jax.lax.stop_gradient(boxes), output_size, scales,
        sampling_ratio=self.sampling_ratio, aligned=self.aligned,
        canonical_scale=self.canonical_scale, canonical_level=self.canonical_level,
        extents=extents)


class BoxHead(nn.Module):
  """TwoMLPHead (fc6, fc7) and FastRCNNPredictor (cls_score, bbox_pred)."""
  num_classes: int
  representation_size: int = 1024
  """Width of fc6 and fc7."""
  bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
  """Box coder weights (wx, wy, ww, wh) of the predicted deltas, for targets and decoding."""
  fg_iou_threshold: float = 0.5
  """Training: RoIs with IoU >= this are foreground."""
  bg_iou_threshold: float = 0.5
  """Training: RoIs with IoU < this are background."""
  batch_size_per_image: int = 512
  """Training: RoIs sampled per image."""
  positive_fraction: float = 0.25
  """Training: maximum foreground fraction of the sampled RoIs."""
  crowd_ioa_threshold: float = 0.5
  """Training: background RoIs covered more than this by a crowd region are not sampled."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [..., S, S, C] pooled features. Returns logits [..., K], deltas [..., K, 4] (float32)."""
    lead = x.shape[:-3]
    x = x.reshape(lead + (-1,))  # (h, w, c) order; the converter permutes torch's (c, h, w)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    x = nn.relu(dense(self.representation_size, "fc6")(x))
    x = nn.relu(dense(self.representation_size, "fc7")(x))
    logits = dense(self.num_classes, "cls_score")(x).astype(jnp.float32)
    deltas = dense(self.num_classes * 4, "bbox_pred")(x).astype(jnp.float32)
    return logits, deltas.reshape(lead + (self.num_classes, 4))


class MaskHead(nn.Module):
  """MaskRCNNHeads (4 x conv3x3 + ReLU) and MaskRCNNPredictor (2x2 deconv + ReLU, 1x1 to K)."""
  num_classes: int
  layers: Sequence[int] = (256, 256, 256, 256)
  """Channels of the 3x3 convs."""
  dilation: int = 1
  """Dilation of the 3x3 convs."""
  num_rois: int = 128
  """Training: foreground RoIs per image that get mask targets (torchvision: all of them, which is
  at most 512 * 0.25 = 128)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [N, S, S, C]. Returns mask logits [N, 2S, 2S, K] float32."""
    for i, ch in enumerate(self.layers):
      x = nn.relu(nn.Conv(ch, (3, 3), padding=((self.dilation,) * 2,) * 2,
                          kernel_dilation=(self.dilation,) * 2, dtype=self.dtype,
                          param_dtype=jnp.float32, name=f"mask_fcn{i + 1}")(x))
    x = nn.relu(ConvTranspose2x2(self.layers[-1], self.dtype, name="conv5_mask")(x))
    return conv(self.num_classes, 1, dtype=self.dtype, name="mask_fcn_logits")(x).astype(
        jnp.float32)


class Postprocess(nn.Module):
  """Per-class decode, clip, score threshold, per-class NMS, top detections (no parameters)."""
  score_threshold: float = 0.05
  """Class scores at or below this are dropped."""
  nms_threshold: float = 0.5
  """IoU threshold of the per-class NMS."""
  detections_per_image: int = 100
  """Detections kept per image."""
  min_size: float = 1e-2
  """Boxes narrower or shorter than this (pixels) are dropped."""
  candidates_per_image: int = 4000
  """Highest-scoring (box, class) pairs entering NMS. Greedy NMS visits boxes by score, so results
  equal torchvision's whenever the last kept detection ranks within this many candidates."""

  def __call__(self, logits, deltas, proposals, proposal_valid, image_size, bbox_reg_weights):
    """One image.

    Args:
      logits: [N, K] class logits; deltas: [N, K, 4]; proposals: [N, 4] (x1, y1, x2, y2);
      proposal_valid: [N] bool; image_size: [2] int32 (h, w) un-padded.
      bbox_reg_weights: the box head's coder weights (wx, wy, ww, wh).

    Returns:
      dict boxes [D, 4], scores [D], labels [D] int32 (1..K-1), valid [D] bool; D detections_per_image.
    """
    n, k = logits.shape
    boxes = box_ops.decode_boxes(deltas, proposals[:, None, :], bbox_reg_weights)
    boxes = box_ops.clip_boxes(boxes, image_size[0].astype(jnp.float32),
                               image_size[1].astype(jnp.float32))
    scores = jax.nn.softmax(logits, axis=-1)
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = jnp.tile(jnp.arange(1, k, dtype=jnp.int32), n)
    valid = (jnp.repeat(proposal_valid, k - 1) & (scores > self.score_threshold)
             & box_ops.box_sizes_at_least(boxes, self.min_size))
    c = min(self.candidates_per_image, scores.shape[0])
    _, cand = jax.lax.top_k(jnp.where(valid, scores, -1.0), c)
    keep, keep_valid = batched_nms(boxes[cand], scores[cand], labels[cand], self.nms_threshold,
                                   self.detections_per_image, valid=valid[cand])
    idx = cand[keep]
    return dict(boxes=jnp.where(keep_valid[:, None], boxes[idx], 0.0),
                scores=jnp.where(keep_valid, scores[idx], 0.0),
                labels=jnp.where(keep_valid, labels[idx], 0), valid=keep_valid)
