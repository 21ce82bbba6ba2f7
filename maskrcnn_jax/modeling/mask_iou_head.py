"""The MaskIoU head of Mask Scoring R-CNN (Huang et al., CVPR 2019), `mask_iou_head.type =
'standard'`, as the official implementation (zjhuang22/maskscoring_rcnn, `roi_maskiou_head`).

It reads the mask head's outputs (`ctx.outputs['mask_head']`) and pools nothing itself: the mask
head's S x S pooled RoI features, concatenated on channels with the 2 x 2 max-pooled 2S x 2S mask
probability of the RoI's class, go through 3x3 convs (the last with stride 2), fcs and one fc with
an output per class; the labelled class' output is the predicted IoU of the mask with its
instance. Inference rescores the masks: mask_scores = box score * predicted IoU. Training
regresses the IoU of the binarized predicted mask with the whole ground-truth instance
(`ops.masks.mask_iou_targets`).
"""
from typing import Any, Dict, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import Conv
from maskrcnn_jax.modeling.roi_heads import HeadContext, RoIHead
from maskrcnn_jax.modeling.samplers import RoISamples
from maskrcnn_jax.ops.masks import mask_iou_targets
from maskrcnn_jax.types import Array


def maskiou_loss(pred_iou: Array, target_iou: Array, valid: Array) -> Array:
  """The official `l2_loss` for one image's RoIs: 0.5 (pred - target)^2 averaged over the valid
  RoIs whose target is above 0 (RoIs with target 0 do not count, as there); 0 when there are none.

  Args:
    pred_iou: [P] predicted IoU of each RoI's ground-truth class; target_iou: [P] float in [0, 1];
    valid: [P] bool.
  """
  counted = valid & (target_iou > 0)
  diff = jnp.where(counted, pred_iou.astype(jnp.float32) - target_iou.astype(jnp.float32), 0.0)
  return jnp.sum(0.5 * diff * diff) / jnp.maximum(jnp.sum(counted), 1).astype(jnp.float32)


def _pick(x: Array, labels: Array) -> Array:
  """x [..., K], labels [...] int32 -> [...] the labelled class' entry."""
  return jnp.take_along_axis(x, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


class MaskIoUHead(RoIHead):
  """`standard`: `conv_layers` 3x3 convs (padding 1, ReLU; the last with stride 2:
  `maskiou_fcn1..`), flatten, `fc_layers` fcs (ReLU: `maskiou_fc1..`), an fc to K outputs
  (`maskiou`). Initialized as the official code: convs Kaiming-normal (fan out, ReLU), the hidden
  fcs Kaiming-uniform (a=1), the last fc N(0, 0.01); biases 0. Works for any pooled size S (the
  mask is 2S x 2S: 14 x 14 features and 28 x 28 masks with an FPN, 7 x 7 and 14 x 14 on a C4
  trunk). Its variables have no torchvision counterpart.

  Mask probabilities: in inference the mask head's `masks` (the labelled class' probability); in
  training its `mask_probs` of the ground-truth class when it gives them, else sigmoid of its
  `mask_logits`. As in the official code, neither the features nor the probabilities are
  detached: the MaskIoU loss also reaches the mask head and the backbone.
  """
  requires = ("mask_head",)
  batch_keys = ()  # reads gt_masks, which the required mask head already asks the batch for
  prediction_keys = ("mask_scores",)
  loss_names = ("loss_maskiou",)

  num_classes: int
  conv_layers: Sequence[int] = (256, 256, 256, 256)
  """Channels of the 3x3 convs; the last has stride 2."""
  fc_layers: Sequence[int] = (1024, 1024)
  """Widths of the hidden fcs."""
  dtype: Any = jnp.float32

  def __post_init__(self):
    if not self.conv_layers or any(int(c) < 1 for c in self.conv_layers):
      raise ValueError("mask_iou_head.conv_layers needs at least one conv, each of positive "
                       f"width; got {self.conv_layers}")
    if any(int(w) < 1 for w in self.fc_layers):
      raise ValueError(f"mask_iou_head.fc_layers must be positive widths, got {self.fc_layers}")
    super().__post_init__()

  @nn.compact
  def __call__(self, features: Array, mask_probs: Array) -> Array:
    """features: [N, S, S, C] the mask head's pooled RoI features; mask_probs: [N, 2S, 2S] mask
    probability of each RoI's class. Returns the predicted IoU per class [N, K] float32."""
    n, h, w = (features.shape + (0, 0, 0))[:3]
    if features.ndim != 4 or mask_probs.shape != (n, 2 * h, 2 * w):
      raise ValueError(f"mask_probs must be [N, 2S, 2S] for features [N, S, S, C]; got "
                       f"{mask_probs.shape} and {features.shape}")
    pooled = jnp.max(mask_probs.reshape(n, h, 2, w, 2), axis=(2, 4))  # max_pool2d(2, stride 2)
    x = jnp.concatenate([features.astype(self.dtype), pooled[..., None].astype(self.dtype)], -1)
    conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    last = len(self.conv_layers) - 1
    for i, ch in enumerate(self.conv_layers):
      stride = 2 if i == last else 1
      x = nn.relu(Conv(ch, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                       kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32,
                       name=f"maskiou_fcn{i + 1}")(x))
    x = x.reshape((n, -1))  # (h, w, c) order
    fc_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # kaiming_uniform_(a=1)
    for j, width in enumerate(self.fc_layers):
      x = nn.relu(nn.Dense(width, kernel_init=fc_init, dtype=self.dtype, param_dtype=jnp.float32,
                           name=f"maskiou_fc{j + 1}")(x))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                    param_dtype=jnp.float32, name="maskiou")(x).astype(jnp.float32)

  def _iou(self, features: Array, probs: Array, labels: Array) -> Array:
    """features [B, N, S, S, C], probs [B, N, 2S, 2S], labels [B, N] -> [B, N] predicted IoU of
    the labelled class."""
    b, n = features.shape[:2]
    if probs.shape[:2] != (b, n) or labels.shape != (b, n):
      raise ValueError(f"the mask head's outputs disagree: features {features.shape}, mask "
                       f"probabilities {probs.shape}, labels {labels.shape}")
    iou = self(features.reshape((b * n,) + features.shape[2:]),
               probs.reshape((b * n,) + probs.shape[2:]))
    return _pick(iou.reshape(b, n, -1), labels)

  @staticmethod
  def _mask_head(ctx: HeadContext, keys: Sequence[str]) -> Mapping[str, Array]:
    out = (ctx.outputs or {}).get("mask_head")
    if out is None or any(k not in out for k in keys):
      raise ValueError(f"the MaskIoU head reads the mask head's {list(keys)}; it gave "
                       f"{None if out is None else sorted(out)}")
    return out

  def predict(self, ctx: HeadContext, detections: Mapping[str, Array]) -> Dict[str, Array]:
    """Returns mask_scores [B, D] (box score x predicted IoU of the labelled class, 0 on invalid
    detections) and, for later heads, mask_iou [B, D] (the predicted IoU)."""
    out = self._mask_head(ctx, ("mask_features", "masks"))
    iou = self._iou(out["mask_features"], out["masks"], detections["labels"])
    scores = jnp.where(detections["valid"], detections["scores"] * iou, 0.0)
    return dict(mask_scores=scores, mask_iou=iou)

  def loss(self, ctx: HeadContext, samples: RoISamples,
           batch: Mapping[str, Array]) -> Dict[str, Array]:
    """`maskiou_loss` on the mask head's foreground RoIs (the same `mask_sampler` samples),
    averaged over images; also mask_iou (predicted) and mask_iou_targets, [B, P] each."""
    out = self._mask_head(ctx, ("mask_features", "mask_targets"))
    if "mask_probs" in out:
      probs = out["mask_probs"]
    elif "mask_logits" in out:
      probs = jax.nn.sigmoid(out["mask_logits"].astype(jnp.float32))
    else:
      raise ValueError(f"the MaskIoU head needs the mask head's mask_probs or mask_logits; it "
                       f"gave {sorted(out)}")
    if out["mask_targets"].shape != probs.shape:
      raise ValueError(f"mask_targets {out['mask_targets'].shape} and mask probabilities "
                       f"{probs.shape} differ")
    targets = jax.vmap(mask_iou_targets)(
        probs, out["mask_targets"], samples.rois, batch["gt_masks"],
        batch["gt_boxes"].astype(jnp.float32), samples.gt_index)
    targets = jax.lax.stop_gradient(targets)
    iou = self._iou(out["mask_features"], probs, samples.classes)
    per_image = jax.vmap(maskiou_loss)(iou, targets, samples.valid)
    return dict(loss_maskiou=jnp.mean(per_image), mask_iou=iou, mask_iou_targets=targets)
