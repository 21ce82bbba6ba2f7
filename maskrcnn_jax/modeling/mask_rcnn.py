"""The two-stage detector: Mask R-CNN, and with other RoI heads (or none) its family.

    backbone -> fpn -> rpn (+ rpn_sampler in training) -> box_pooler -> box_head -> postprocess
                                                   \\-> roi_sampler (training)
    then every RoI head in order (mask_head, ...): predict on the detections, or loss on its samples

Built from `config.model` by `builder.build_model`; with `mask_head.type='none'` (`mask_on=False`)
it is Faster R-CNN. A C4 model (`backbone.type='resnet_c4'`, the paper's ResNet-C4) has no FPN:
the RPN and every pooler read C4 (stride 16), and ResNet's last stage (`roi_trunk`) runs on every
pooled RoI before the heads, average-pooled for the box head, as Detectron2's `Res5ROIHeads`.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.losses import fastrcnn_loss, objective, rpn_loss
from maskrcnn_jax.modeling.poolers import RoIPooler
from maskrcnn_jax.modeling.resnet import ResNet, ResNetStage
from maskrcnn_jax.modeling.roi_heads import BoxHead, HeadContext, Postprocess
from maskrcnn_jax.modeling.rpn import RPN
from maskrcnn_jax.modeling.samplers import AnchorSampler, GroundTruth, RoISampler
from maskrcnn_jax.ops.boxes import encode_boxes
from maskrcnn_jax.ops.images import normalize_images
from maskrcnn_jax.types import Array

# What every training batch holds (heads add their `batch_keys`).
BATCH_KEYS = ("image", "image_size", "gt_boxes", "gt_classes", "gt_valid", "crowd_boxes",
              "crowd_valid")
BOX_LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


class MaskRCNN(nn.Module):
  """ResNet-FPN, RPN, box head and the configured RoI heads (Mask R-CNN: the FCN mask head).

  Each field is one config section (see `builder`). Parameter paths mirror torchvision's
  state_dict names (see `maskrcnn_jax.convert`).
  """
  num_classes: int
  """Classes including background (91 for COCO's category ids)."""
  backbone: ResNet
  fpn: Optional[FPN]
  """None in C4 models (the RPN and poolers read C4)."""
  rpn: RPN
  box_pooler: RoIPooler
  box_head: BoxHead
  postprocess: Postprocess
  rpn_sampler: AnchorSampler = AnchorSampler()
  roi_sampler: RoISampler = RoISampler()
  roi_heads: Tuple[Tuple[str, nn.Module, Any], ...] = ()
  """(section, head module, sampler or None) per RoI head after the box head, in order; a head
  without a sampler trains on the box head's RoI samples. Each head's variables live under its
  section's name."""
  loss_weights: Tuple[Tuple[str, float], ...] = ()
  """(loss name, weight) for `objective`; absent losses weigh 1."""
  roi_trunk: Optional[ResNetStage] = None
  """C4 models: ResNet's last stage, shared by the RoI heads (applied by `HeadContext.pool`)."""

  def setup(self):
    for name, head, _ in self.roi_heads:
      setattr(self, name, head.clone(parent=None))

  # -- introspection (no parameters needed) --------------------------------------------------

  def head(self, name: str) -> Optional[nn.Module]:
    """The (unbound) RoI head configured under section `name`, or None if it is off."""
    return next((h for n, h, _ in self.roi_heads if n == name), None)

  @property
  def head_names(self) -> Tuple[str, ...]:
    return tuple(n for n, _, _ in self.roi_heads)

  @property
  def eval_tasks(self) -> Tuple[str, ...]:
    """COCO evaluations of this model's predictions: 'bbox', then each head's ('segm', ...)."""
    return ("bbox",) + tuple(h.eval_task for _, h, _ in self.roi_heads if h.eval_task)

  @property
  def prediction_keys(self) -> Tuple[str, ...]:
    """Per-detection outputs beyond boxes, scores and labels ('masks', ...)."""
    return tuple(k for _, h, _ in self.roi_heads for k in h.prediction_keys)

  @property
  def point_keys(self) -> Tuple[str, ...]:
    """Prediction keys that hold points in canvas pixels (see `RoIHead.point_keys`)."""
    return tuple(k for _, h, _ in self.roi_heads for k in getattr(h, "point_keys", ()))

  @property
  def batch_keys(self) -> Tuple[str, ...]:
    """The batch entries `losses` reads."""
    return BATCH_KEYS + tuple(k for _, h, _ in self.roi_heads for k in h.batch_keys
                              if k not in BATCH_KEYS)

  @property
  def loss_names(self) -> Tuple[str, ...]:
    return BOX_LOSSES + tuple(k for _, h, _ in self.roi_heads for k in h.loss_names)

  def objective(self, losses: Mapping[str, Array]) -> Array:
    """The training objective: every `loss_*` of `losses`, weighted by `loss_weights`."""
    return objective(losses, dict(self.loss_weights))

  # -- forward passes ------------------------------------------------------------------------

  @property
  def levels(self) -> Tuple[int, ...]:
    """The feature levels the RPN and the poolers read: (2, ..., 6) with an FPN, (4,) for C4."""
    return tuple(self.rpn.levels)

  def features(self, images, padded_sizes=None, train: bool = False,
               axis_name: Optional[str] = None):
    """images: [B, H, W, 3] normalized, H and W multiples of 32; padded_sizes: [B, 2] int32 or None
    (see `layers.mask_to_extent`). Returns the maps of `levels`: [P2..P6], or [C4]."""
    feats = self.backbone(images, padded_sizes, train, axis_name)
    if self.fpn is None:
      return [feats[f"c{level}"] for level in self.levels]
    return self.fpn(feats, padded_sizes, train, axis_name)

  def _context(self, pyramid, padded_sizes, train, axis_name) -> HeadContext:
    levels = dict(zip(self.levels, pyramid))
    return HeadContext(levels, padded_sizes, train, axis_name, self.roi_trunk, {})

  def _box_features(self, ctx: HeadContext, boxes: Array) -> Array:
    """boxes [B, N, 4] canvas pixels -> the box head's input [B, N, S, S, C] ([B, N, 1, 1, C]:
    the RoI trunk's output averaged, in C4 models)."""
    x = ctx.pool(self.box_pooler, boxes)
    if ctx.trunk is not None:
      x = jnp.mean(x.astype(jnp.float32), axis=(-3, -2), keepdims=True).astype(x.dtype)
    return x

  def initialize(self, images):
    """Creates every variable cheaply (`model.init(key, images, method=MaskRCNN.initialize)`):
    the backbone and the RPN head on `images` [B, H, W, 3] (no proposal selection), and the box
    head and each RoI head's `predict` on one box per image."""
    b = images.shape[0]
    pyramid = self.features(images)
    self.rpn.head(pyramid)
    ctx = self._context(pyramid, None, False, None)
    dets = dict(boxes=jnp.tile(jnp.asarray([[[0.0, 0.0, 16.0, 16.0]]]), (b, 1, 1)),
                labels=jnp.ones((b, 1), jnp.int32), scores=jnp.ones((b, 1)),
                valid=jnp.ones((b, 1), bool))
    self.box_head(self._box_features(ctx, dets["boxes"]))
    for name, head, _ in self.roi_heads:
      out = getattr(self, name).predict(ctx, dets)
      ctx.outputs[name] = out
      dets.update({k: out[k] for k in head.prediction_keys})

  def __call__(self, images, image_sizes, padded_sizes) -> Dict[str, jnp.ndarray]:
    """Inference.

    Args:
      images: [B, Hc, Wc, 3] float32 normalized, zero-padded canvas (multiples of 32).
      image_sizes: [B, 2] int32 (h, w) of the resized image inside the canvas.
      padded_sizes: [B, 2] int32 (h, w) torchvision would pad each image to (round up to 32);
        equal to (Hc, Wc) for exact, torchvision-identical results.

    Returns:
      boxes [B, D, 4] (x1, y1, x2, y2) resized-image pixels, scores [B, D], labels [B, D] int32,
      valid [B, D] bool, proposals [B, P, 4] and proposal_valid [B, P], and each head's
      `prediction_keys` (the mask head's masks [B, D, 2S, 2S]: probabilities of the labelled
      class; 28 x 28 with FPN, 14 x 14 in C4 models).
    """
    pyramid, dets = self.detect(images, image_sizes, padded_sizes)
    return self.predict_heads(pyramid, padded_sizes, dets)

  def detect(self, images, image_sizes, padded_sizes):
    """The first part of `__call__`: backbone, RPN, box head and its postprocess.

    Returns:
      (pyramid, dets): the feature maps of `levels`, and the detections boxes, scores, labels,
      valid [B, D] (valid ones first, in score order), proposals and proposal_valid, as in
      `__call__` before the RoI heads.
    """
    pyramid = self.features(images, padded_sizes)
    rpn_out = self.rpn(pyramid, image_sizes, padded_sizes, train=False)
    props, props_valid = rpn_out["proposals"], rpn_out["proposal_valid"]
    ctx = self._context(pyramid, padded_sizes, False, None)
    logits, deltas = self.box_head(self._box_features(ctx, props))
    dets = jax.vmap(lambda *a: self.postprocess(*a, self.box_head.bbox_reg_weights))(
        logits, deltas, props, props_valid, image_sizes)
    dets["proposals"] = props
    dets["proposal_valid"] = props_valid
    return pyramid, dets

  def predict_heads(self, pyramid, padded_sizes, dets):
    """The second part of `__call__`: every RoI head's `predict` on `dets` (of `detect`, or its
    first D' <= D detection slots: inference runs the heads on a bucket holding the valid ones).
    Returns `dets` with the heads' `prediction_keys` added ([B, D', ...])."""
    ctx = self._context(pyramid, padded_sizes, False, None)
    dets = dict(dets)
    for name, _, _ in self.roi_heads:
      out = getattr(self, name).predict(ctx, dets)
      ctx.outputs[name] = out
      dets.update({k: out[k] for k in self.head(name).prediction_keys})
    return dets

  def losses(self, batch: Mapping[str, Array], keys: Array,
             axis_name: Optional[str] = None) -> Dict[str, jnp.ndarray]:
    """Training forward on one device's batch: targets, sampling and every head's losses.

    Batch-statistics norms see the whole batch (averaged over `axis_name`'s devices too); call
    with `mutable=['batch_stats']` to collect their updated running statistics.

    Args:
      batch: a dict holding `batch_keys`:
        image [B, H, W, 3] normalized float canvas (H, W multiples of 32), or the uint8
          canvas of the resized RGB image (`data.image_dtype='uint8'`), normalized here;
        image_size [B, 2] int32 (h, w) of the resized image inside the canvas;
        gt_boxes [B, M, 4] float32 (x1, y1, x2, y2) canvas pixels; gt_classes [B, M] int32 in
          1..K-1; gt_valid [B, M] bool;
        crowd_boxes [B, C, 4] and crowd_valid [B, C] bool (optional): crowd regions, never
          positives, and negatives they cover are not sampled;
        and what the heads read (the mask head: gt_masks [B, M, S, S] float in [0, 1], each
          instance's mask cut to its box and resized to S).
      keys: [B] PRNG keys, one per example (the anchor and RoI samplers draw from it), so the
        samples do not depend on how a global batch is split.
      axis_name: the mapped data axis of the train step, or None.

    Returns:
      every `loss_*` (float32 scalars, means over images; torchvision's names: loss_objectness,
      loss_rpn_box_reg, loss_classifier, loss_box_reg, then the heads', e.g. loss_mask) and
      'num_fg_rois' (mean per image).
    """
    images = batch["image"]
    b = images.shape[0]
    if keys.shape[:1] != (b,):
      raise ValueError(f"keys must be [B] = [{b}] PRNG keys, got shape {keys.shape}")
    missing = [k for k in self.batch_keys if k not in batch and not k.startswith("crowd_")]
    if missing:
      raise ValueError(f"the batch lacks {missing} (this model's losses read {self.batch_keys})")
    image_sizes = batch["image_size"]
    if images.dtype == jnp.uint8:  # sent as uint8: normalized on the device
      images = normalize_images(images, image_sizes)
    canvas = jnp.tile(jnp.asarray(images.shape[1:3], jnp.int32), (b, 1))
    gt = GroundTruth(
        batch["gt_boxes"].astype(jnp.float32), batch["gt_classes"], batch["gt_valid"],
        batch.get("crowd_boxes", jnp.zeros((b, 0, 4), jnp.float32)).astype(jnp.float32),
        batch.get("crowd_valid", jnp.zeros((b, 0), bool)))
    pyramid = self.features(images, None, True, axis_name)
    rpn_out = self.rpn(pyramid, image_sizes, canvas, train=True)
    pair = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    pos, neg, rpn_tgt = jax.vmap(self.rpn_sampler)(pair[:, 0], rpn_out["anchors"],
                                                   rpn_out["anchor_valid"], gt)
    loss_obj, loss_rpn_box = jax.vmap(rpn_loss)(rpn_out["objectness"], rpn_out["deltas"], rpn_tgt,
                                                pos, neg)
    samples = jax.vmap(self.roi_sampler)(pair[:, 1], rpn_out["proposals"],
                                         rpn_out["proposal_valid"], gt)
    ctx = self._context(pyramid, None, True, axis_name)
    bh = self.box_head
    logits, deltas = bh(self._box_features(ctx, samples.rois), True, axis_name, samples.valid)
    matched = jax.vmap(lambda boxes, i: boxes[i])(gt.boxes, samples.gt_index)
    targets = jax.vmap(lambda m, r, p: encode_boxes(jnp.where(p[:, None], m, r), r,
                                                    bh.bbox_reg_weights))(
        matched, samples.rois, samples.is_positive)
    loss_cls, loss_box = jax.vmap(fastrcnn_loss)(logits, deltas, samples.classes, targets,
                                                 samples.valid)
    out = dict(loss_objectness=jnp.mean(loss_obj), loss_rpn_box_reg=jnp.mean(loss_rpn_box),
               loss_classifier=jnp.mean(loss_cls), loss_box_reg=jnp.mean(loss_box),
               num_fg_rois=jnp.mean(jnp.sum(samples.is_positive, axis=1).astype(jnp.float32)))
    for name, head, sampler in self.roi_heads:
      head_samples = samples if sampler is None else jax.vmap(sampler)(samples)
      head_out = getattr(self, name).loss(ctx, head_samples, batch)
      returned = {k for k in head_out if k.startswith("loss_")}
      if returned != set(head.loss_names):
        raise ValueError(f"{name}.loss returned the losses {sorted(returned)}; its loss_names "
                         f"are {sorted(head.loss_names)}")
      ctx.outputs[name] = head_out
      out.update({k: head_out[k] for k in head.loss_names})
    return out


def init_variables(model: MaskRCNN, key: Array, image_size: int = 64) -> Dict[str, Any]:
  """`{'params', 'batch_stats'}` of `model` initialized from `key` (jittable; under
  `jax.eval_shape` it gives the variables' shapes without computing anything)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = model.init(key, images, method=MaskRCNN.initialize)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
