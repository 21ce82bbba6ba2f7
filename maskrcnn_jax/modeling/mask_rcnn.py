"""The composed Mask R-CNN (or Faster R-CNN with `mask_on=False`)."""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.losses import fastrcnn_loss, maskrcnn_loss, rpn_loss
from maskrcnn_jax.modeling.resnet import ResNet
from maskrcnn_jax.modeling.roi_heads import BoxHead, MaskHead, Postprocess, RoIPooler
from maskrcnn_jax.modeling.rpn import RPN
from maskrcnn_jax.ops.boxes import encode_boxes
from maskrcnn_jax.ops.matching import MatchLabel, crowd_overlap, match_boxes
from maskrcnn_jax.ops.roi_align import roi_align_batched
from maskrcnn_jax.ops.sampling import sample_balanced, sample_indices


class MaskRCNN(nn.Module):
  """ResNet-FPN, RPN, box head and (optionally) FCN mask head.

  Built from a config tree by `build_model`; each sub-module's fields are one config section.
  Parameter paths mirror torchvision's state_dict names (see `maskrcnn_jax.convert`).
  """
  num_classes: int
  """Classes including background (91 for COCO's category ids)."""
  backbone: ResNet
  fpn: FPN
  rpn: RPN
  roi_align: RoIPooler
  box_head: BoxHead
  mask_head: Optional[MaskHead]
  """None turns the model into Faster R-CNN."""
  postprocess: Postprocess

  def features(self, images, padded_sizes=None):
    """images: [B, H, W, 3] normalized, H and W multiples of 32; padded_sizes: [B, 2] int32 or None
    (see `layers.mask_to_extent`). Returns [P2..P6]."""
    return self.fpn(self.backbone(images, padded_sizes), padded_sizes)

  def __call__(self, images, image_sizes, padded_sizes) -> Dict[str, jnp.ndarray]:
    """Inference.

    Args:
      images: [B, Hc, Wc, 3] float32 normalized, zero-padded canvas (multiples of 32).
      image_sizes: [B, 2] int32 (h, w) of the resized image inside the canvas.
      padded_sizes: [B, 2] int32 (h, w) torchvision would pad each image to (round up to 32);
        equal to (Hc, Wc) for exact, torchvision-identical results.

    Returns:
      boxes [B, D, 4] (x1, y1, x2, y2) resized-image pixels, scores [B, D], labels [B, D] int32,
      valid [B, D] bool, and with masks masks [B, D, 28, 28] probabilities of the labelled class.
    """
    pyramid = self.features(images, padded_sizes)
    rpn_out = self.rpn(pyramid, image_sizes, padded_sizes, train=False)
    props, props_valid = rpn_out["proposals"], rpn_out["proposal_valid"]
    pooled = self.roi_align(pyramid[:4], props, self.roi_align.box_output_size, padded_sizes)
    logits, deltas = self.box_head(pooled)
    dets = jax.vmap(lambda *a: self.postprocess(*a, self.box_head.bbox_reg_weights))(
        logits, deltas, props, props_valid, image_sizes)
    dets["proposals"] = props
    dets["proposal_valid"] = props_valid
    if self.mask_head is not None:
      pooled = self.roi_align(pyramid[:4], dets["boxes"], self.roi_align.mask_output_size,
                              padded_sizes)
      b, d = pooled.shape[:2]
      mask_logits = self.mask_head(pooled.reshape((b * d,) + pooled.shape[2:]))
      mask_logits = mask_logits.reshape((b, d) + mask_logits.shape[1:])  # [B, D, 2S, 2S, K]
      picked = jnp.take_along_axis(mask_logits, dets["labels"][:, :, None, None, None], axis=-1)
      dets["masks"] = jax.nn.sigmoid(picked[..., 0])
    return dets

  def losses(self, images, image_sizes, gt_boxes, gt_classes, gt_valid, gt_masks=None,
             crowd_boxes=None, crowd_valid=None) -> Dict[str, jnp.ndarray]:
    """Training forward: targets, sampling and torchvision's five losses (each a per-image mean).

    Needs a PRNG stream 'sampling' (`rngs={'sampling': key}`) for the anchor and RoI samplers.

    Args:
      images: [B, H, W, 3] normalized canvas (H, W multiples of 32).
      image_sizes: [B, 2] int32 (h, w) of the resized image inside the canvas.
      gt_boxes: [B, M, 4] float32 (x1, y1, x2, y2) canvas pixels; gt_classes: [B, M] int32 in
        1..K-1; gt_valid: [B, M] bool.
      gt_masks: [B, M, S, S] float in [0, 1], each instance's mask cut to its box and resized to S
        (needed with a mask head).
      crowd_boxes: [B, C, 4] and crowd_valid: [B, C] bool, or None: crowd regions, never positives,
        and negatives they cover are not sampled.

    Returns:
      {'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier', 'loss_box_reg', 'loss_mask'}
      float32 scalars (loss_mask only with a mask head), plus 'num_fg_rois' (mean per image).
    """
    b = images.shape[0]
    canvas = jnp.tile(jnp.asarray(images.shape[1:3], jnp.int32), (b, 1))
    if crowd_boxes is None:
      crowd_boxes = jnp.zeros((b, 0, 4), jnp.float32)
      crowd_valid = jnp.zeros((b, 0), bool)
    gt_boxes = gt_boxes.astype(jnp.float32)
    pyramid = self.features(images)
    rpn_out = self.rpn(pyramid, image_sizes, canvas, train=True)
    keys = jax.random.split(self.make_rng("sampling"), 2 * b)
    rpn_keys, roi_keys = keys[:b], keys[b:]

    def rpn_targets(key, anchors, anchor_valid, boxes, valid, crowd, cvalid):
      r = self.rpn
      matched, labels = match_boxes(anchors, boxes, valid, r.fg_iou_threshold,
                                    r.bg_iou_threshold, True)
      crowded = crowd_overlap(anchors, crowd, cvalid) > r.crowd_ioa_threshold
      positive = (labels == MatchLabel.POSITIVE) & anchor_valid
      negative = (labels == MatchLabel.NEGATIVE) & anchor_valid & ~crowded
      pos, neg = sample_balanced(key, positive, negative, r.batch_size_per_image,
                                 r.positive_fraction)
      # Non-positives encode against themselves (target 0): a padding or empty ground truth would
      # give log(0) targets whose masked loss still has NaN gradients.
      target_boxes = jnp.where(positive[:, None], boxes[matched], anchors)
      return pos, neg, encode_boxes(target_boxes, anchors)

    pos, neg, rpn_tgt = jax.vmap(rpn_targets)(
        rpn_keys, rpn_out["anchors"], rpn_out["anchor_valid"], gt_boxes, gt_valid, crowd_boxes,
        crowd_valid)
    loss_obj, loss_rpn_box = jax.vmap(rpn_loss)(rpn_out["objectness"], rpn_out["deltas"], rpn_tgt,
                                                pos, neg)

    bh = self.box_head

    def roi_targets(key, props, props_valid, boxes, classes, valid, crowd, cvalid):
      cands = jnp.concatenate([jax.lax.stop_gradient(props), boxes], 0)
      cands_valid = jnp.concatenate([props_valid, valid], 0)
      matched, labels = match_boxes(cands, boxes, valid, bh.fg_iou_threshold,
                                    bh.bg_iou_threshold, False)
      crowded = crowd_overlap(cands, crowd, cvalid) > bh.crowd_ioa_threshold
      positive = (labels == MatchLabel.POSITIVE) & cands_valid
      negative = (labels == MatchLabel.NEGATIVE) & cands_valid & ~crowded
      idx, is_pos, ok = sample_indices(key, positive, negative, bh.batch_size_per_image,
                                       bh.positive_fraction)
      rois, gt_idx = cands[idx], matched[idx]
      cls = jnp.where(is_pos, classes[gt_idx], 0)
      tgt = encode_boxes(jnp.where(is_pos[:, None], boxes[gt_idx], rois), rois,
                         bh.bbox_reg_weights)
      return rois, cls, tgt, ok, is_pos, gt_idx

    rois, roi_cls, roi_tgt, roi_ok, roi_pos, roi_gt = jax.vmap(roi_targets)(
        roi_keys, rpn_out["proposals"], rpn_out["proposal_valid"], gt_boxes, gt_classes, gt_valid,
        crowd_boxes, crowd_valid)
    pooled = self.roi_align(pyramid[:4], rois, self.roi_align.box_output_size)
    logits, deltas = self.box_head(pooled)
    loss_cls, loss_box = jax.vmap(fastrcnn_loss)(logits, deltas, roi_cls, roi_tgt, roi_ok)
    out = dict(loss_objectness=jnp.mean(loss_obj), loss_rpn_box_reg=jnp.mean(loss_rpn_box),
               loss_classifier=jnp.mean(loss_cls), loss_box_reg=jnp.mean(loss_box),
               num_fg_rois=jnp.mean(jnp.sum(roi_pos, axis=1).astype(jnp.float32)))
    if self.mask_head is not None:
      if gt_masks is None:
        raise ValueError("a model with a mask head needs gt_masks to train")
      p = self.mask_head.num_rois
      # Sampled positives come first, so the first p slots hold them all when p >= 128.
      m_rois, m_cls, m_gt = rois[:, :p], roi_cls[:, :p], roi_gt[:, :p]
      m_ok = roi_pos[:, :p] & roi_ok[:, :p]
      pooled = self.roi_align(pyramid[:4], m_rois, self.roi_align.mask_output_size)
      mask_logits = self.mask_head(pooled.reshape((b * p,) + pooled.shape[2:]))
      mask_logits = mask_logits.reshape((b, p) + mask_logits.shape[1:])
      targets = jax.vmap(project_mask_crops, in_axes=(0, 0, 0, 0, None))(
          gt_masks, gt_boxes, m_gt, m_rois, mask_logits.shape[2])
      out["loss_mask"] = jnp.mean(jax.vmap(maskrcnn_loss)(mask_logits, m_cls, targets, m_ok))
    return out


def project_mask_crops(crops, gt_boxes, gt_index, rois, size: int):
  """Mask targets: each RoI's ground-truth crop resampled into the RoI, as `project_masks_on_boxes`.

  The crops cover their ground-truth boxes (crop pixel (i, j) samples the box at ((j + .5) / S,
  (i + .5) / S) of its extent), so a RoI maps into crop coordinates by an affine map and RoIAlign
  (aligned=True) samples it there; outside the crop the target is 0. torchvision cuts targets from
  the full mask with `roi_align(aligned=False)`, which reads pixel k's value at coordinate k rather
  than k + 0.5; the RoI is shifted by half a pixel so that the targets follow that convention.

  Args:
    crops: [M, S, S] float in [0, 1]; gt_boxes: [M, 4] (x1, y1, x2, y2); gt_index: [P] int32;
    rois: [P, 4] (x1, y1, x2, y2); size: output side (28).

  Returns:
    [P, size, size] float32 in [0, 1].
  """
  s = crops.shape[-1]
  g = gt_boxes[gt_index]
  scale_x = s / jnp.maximum(g[:, 2] - g[:, 0], 1e-6)
  scale_y = s / jnp.maximum(g[:, 3] - g[:, 1], 1e-6)
  local = (rois + 0.5 - jnp.stack([g[:, 0], g[:, 1], g[:, 0], g[:, 1]], -1)) * jnp.stack(
      [scale_x, scale_y, scale_x, scale_y], -1)
  maps = crops[gt_index].astype(jnp.float32)[..., None]  # [P, S, S, 1]
  out = roi_align_batched(maps, jax.lax.stop_gradient(local)[:, None], size, 1.0,
                          sampling_ratio=2, aligned=True)
  return out[:, 0, ..., 0]
