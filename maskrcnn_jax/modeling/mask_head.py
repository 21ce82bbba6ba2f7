"""The FCN mask head (`mask_head.type = 'fcn'`): torchvision's MaskRCNNHeads + MaskRCNNPredictor."""
from typing import Any, Dict, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import ConvTranspose2x2, Norm, check_norm, conv
from maskrcnn_jax.modeling.losses import maskrcnn_loss
from maskrcnn_jax.modeling.poolers import RoIPooler
from maskrcnn_jax.modeling.roi_heads import HeadContext, RoIHead
from maskrcnn_jax.modeling.samplers import RoISamples
from maskrcnn_jax.ops.masks import project_mask_crops, select_class_channel
from maskrcnn_jax.types import Array


class MaskHead(RoIHead):
  """`layers` x (3x3 conv [+ norm] + ReLU), a 2x2 stride-2 deconv + ReLU, a 1x1 conv to one channel
  per class: per-pixel sigmoid masks of size 2S for S x S pooled RoIs (28 x 28 from 14 x 14)."""
  batch_keys = ("gt_masks",)
  prediction_keys = ("masks",)
  loss_names = ("loss_mask",)
  eval_task = "segm"

  num_classes: int
  pooler: RoIPooler = RoIPooler(output_size=14)
  """The `mask_pooler` section."""
  layers: Sequence[int] = (256, 256, 256, 256)
  """Channels of the 3x3 convs."""
  dilation: int = 1
  """Dilation of the 3x3 convs."""
  norm: str = "none"
  """Norm after each 3x3 conv (`layers.NORM_TYPES`): 'none' in torchvision v1, 'bn' in v2."""
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_norm(self.norm, "mask_head.norm", self.layers)
    if not self.layers:
      raise ValueError("mask_head.layers needs at least one conv")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False, axis_name=None, mask=None):
    """x: [N, S, S, C] pooled features; mask: [N] bool RoIs that count in batch statistics.

    Returns mask logits [N, 2S, 2S, K] float32."""
    for i, ch in enumerate(self.layers):
      x = nn.Conv(ch, (3, 3), padding=((self.dilation,) * 2,) * 2,
                  kernel_dilation=(self.dilation,) * 2, use_bias=self.norm == "none",
                  dtype=self.dtype, param_dtype=jnp.float32, name=f"mask_fcn{i + 1}")(x)
      x = nn.relu(Norm(self.norm, dtype=self.dtype, name=f"mask_norm{i + 1}")(
          x, train, axis_name, mask))
    x = nn.relu(ConvTranspose2x2(self.layers[-1], self.dtype, name="conv5_mask")(x))
    return conv(self.num_classes, 1, dtype=self.dtype, name="mask_fcn_logits")(x).astype(
        jnp.float32)

  def _logits(self, ctx: HeadContext, boxes: Array, valid: Array):
    """boxes [B, N, 4] -> (pooled [B, N, S, S, C], logits [B, N, 2S, 2S, K])."""
    pooled = ctx.pool(self.pooler, boxes)
    b, n = pooled.shape[:2]
    logits = self(pooled.reshape((b * n,) + pooled.shape[2:]), ctx.train, ctx.axis_name,
                  valid.reshape(-1))
    return pooled, logits.reshape((b, n) + logits.shape[1:])

  def predict(self, ctx: HeadContext, detections: Mapping[str, Array]) -> Dict[str, Array]:
    """Returns masks [B, D, 2S, 2S] (the labelled class' probability) and, for later heads,
    mask_features [B, D, S, S, C] and mask_logits [B, D, 2S, 2S] of the labelled class."""
    pooled, logits = self._logits(ctx, detections["boxes"], detections["valid"])
    picked = select_class_channel(logits, detections["labels"])
    return dict(masks=jax.nn.sigmoid(picked), mask_features=pooled, mask_logits=picked)

  def loss(self, ctx: HeadContext, samples: RoISamples,
           batch: Mapping[str, Array]) -> Dict[str, Array]:
    """torchvision's `maskrcnn_loss` on the sampled foreground RoIs, averaged over images; also
    mask_features, mask_logits (labelled class) and mask_targets [B, P, 2S, 2S] for later heads."""
    if batch.get("gt_masks") is None:
      raise ValueError("a model with a mask head needs gt_masks to train")
    pooled, logits = self._logits(ctx, samples.rois, samples.valid)
    targets = jax.vmap(project_mask_crops, in_axes=(0, 0, 0, 0, None))(
        batch["gt_masks"], batch["gt_boxes"].astype(jnp.float32), samples.gt_index, samples.rois,
        logits.shape[2])
    per_image = jax.vmap(maskrcnn_loss)(logits, samples.classes, targets, samples.valid)
    return dict(loss_mask=jnp.mean(per_image), mask_features=pooled,
                mask_logits=select_class_channel(logits, samples.classes), mask_targets=targets)
