"""Mask heads (`mask_head.type`): 'fcn', torchvision's MaskRCNNHeads + MaskRCNNPredictor, and
'mlp', the Mask R-CNN paper's fc mask head (Table 2e). Both predict per-class masks (or one
class-agnostic mask) and train with the per-class sigmoid loss or the per-pixel softmax loss over
the classes (Table 2b); only the layers between the pooled features and the mask logits differ."""
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import (
    Conv,
    Conv1x1PerLabel,
    ConvTranspose2x2,
    Norm,
    check_norm,
)
from maskrcnn_jax.modeling.losses import maskrcnn_loss, maskrcnn_softmax_loss
from maskrcnn_jax.modeling.poolers import RoIPooler
from maskrcnn_jax.modeling.roi_heads import (
    HeadContext,
    RoIHead,
    check_train_buckets,
    loss_on_slot_bucket,
)
from maskrcnn_jax.modeling.samplers import RoISamples
from maskrcnn_jax.ops.masks import project_mask_crops, select_class_channel
from maskrcnn_jax.types import Array

MASK_LOSSES = ("sigmoid", "softmax")


class MaskHeadBase(RoIHead):
  """What every mask head shares: the output channels, `predict` and `loss`. A subclass adds its
  architecture fields and an `@nn.compact __call__` from pooled RoI features [N, S, S, C] to mask
  logits [N, 2S, 2S, `mask_channels`] float32.

  Output channels: K per-class maps; class-agnostic, one map (sigmoid) or two, (background,
  foreground) (softmax). Probabilities: sigmoid of the labelled class' channel, or its softmax
  probability over the channels.
  """
  batch_keys = ("gt_masks",)
  prediction_keys = ("masks",)
  loss_names = ("loss_mask",)
  eval_task = "segm"

  num_classes: int
  pooler: RoIPooler = RoIPooler(output_size=14)
  """The `mask_pooler` section."""
  class_agnostic: bool = False
  """One mask for every class (`mask_head.class_agnostic`) instead of one per class."""
  loss_type: str = "sigmoid"
  """`mask_head.loss` (the config key; `loss` is the head's method): 'sigmoid', per-class binary
  cross-entropy (torchvision); 'softmax', per-pixel cross-entropy over the classes, background
  included (`losses.maskrcnn_softmax_loss`)."""
  dtype: Any = jnp.float32
  train_buckets: Tuple[int, ...] = (32, 64)
  """`mask_head.train_buckets`: in training, the head runs on the smallest of these slot counts per
  image (or on all `mask_sampler.num_rois` slots) that holds every image's foreground RoIs
  (`roi_heads.loss_on_slot_bucket`: picked on the device, equal results; TPU programs always run
  all slots). () = always all slots."""

  def __post_init__(self):
    check_train_buckets(self.train_buckets, "mask_head")
    if self.loss_type not in MASK_LOSSES:
      raise ValueError(f"mask_head.loss must be one of {MASK_LOSSES}, got {self.loss_type!r}")
    if not isinstance(self.class_agnostic, bool):
      raise ValueError(f"mask_head.class_agnostic must be a bool, got {self.class_agnostic!r}")
    super().__post_init__()

  @property
  def mask_channels(self) -> int:
    """Channels of the mask logits: K; class-agnostic 1 (sigmoid) or 2 (softmax)."""
    if self.class_agnostic:
      return 2 if self.loss_type == "softmax" else 1
    return self.num_classes

  def _channel(self, labels: Array) -> Array:
    """labels [...] int32 -> each one's channel: the class, or the class-agnostic foreground
    (channel 1 of softmax logits; the one channel of sigmoid logits serves any label)."""
    if self.class_agnostic and self.loss_type == "softmax":
      return jnp.ones_like(labels)
    return labels

  def class_logits(self, logits: Array, labels: Array) -> Array:
    """The labelled class' mask logit, as a sigmoid logit: sigmoid(out) is its probability.

    Args:
      logits: [N..., 2S, 2S, mask_channels] this head's logits; labels: [N...] int32 classes.

    Returns:
      [N..., 2S, 2S]: sigmoid loss, the class' channel; softmax loss, l_c - logsumexp_{j != c} l_j
      (whose sigmoid is the softmax probability p_c).
    """
    channel = self._channel(labels)
    picked = select_class_channel(logits, channel)
    if self.loss_type == "sigmoid":
      return picked
    own = jnp.arange(logits.shape[-1]) == channel.reshape(channel.shape + (1, 1, 1))
    return picked - jax.nn.logsumexp(jnp.where(own, -jnp.inf, logits), axis=-1)

  # Whether __call__ takes `labels` and then computes only each RoI's labelled channel.
  per_label_logits = False

  def _logits(self, ctx: HeadContext, boxes: Array, valid: Array, labels: Array):
    """boxes [B, N, 4], labels [B, N] -> (pooled [B, N, S, S, C], logits [B, N, 2S, 2S, M]):
    M = mask_channels, or 1 (the labelled class' channel) where the head computes only that one
    (per-class sigmoid: all that the loss and the predictions read)."""
    pooled = ctx.pool(self.pooler, boxes)
    b, n = pooled.shape[:2]
    kw = {}
    if self.per_label_logits and self.loss_type == "sigmoid" and not self.class_agnostic:
      kw["labels"] = labels.reshape(-1)
    logits = self(pooled.reshape((b * n,) + pooled.shape[2:]), ctx.train, ctx.axis_name,
                  valid.reshape(-1), **kw)
    return pooled, logits.reshape((b, n) + logits.shape[1:])

  def predict(self, ctx: HeadContext, detections: Mapping[str, Array]) -> Dict[str, Array]:
    """Returns masks [B, D, 2S, 2S] (the labelled class' probability) and, for later heads,
    mask_probs (the same), mask_features [B, D, S, S, C] and mask_logits [B, D, 2S, 2S] (the
    labelled class', `class_logits`)."""
    pooled, logits = self._logits(ctx, detections["boxes"], detections["valid"],
                                  detections["labels"])
    picked = self.class_logits(logits, detections["labels"])
    probs = jax.nn.sigmoid(picked)
    return dict(masks=probs, mask_probs=probs, mask_features=pooled, mask_logits=picked)

  def loss(self, ctx: HeadContext, samples: RoISamples,
           batch: Mapping[str, Array]) -> Dict[str, Array]:
    """The mask loss (`loss_type`) on the sampled foreground RoIs, averaged over images; also, for
    later heads, mask_features, mask_logits and mask_probs of the ground-truth class (as in
    `predict`) and mask_targets [B, P, 2S, 2S]."""
    if batch.get("gt_masks") is None:
      raise ValueError("a model with a mask head needs gt_masks to train")
    return loss_on_slot_bucket(self, ctx, samples, self.train_buckets,
                               lambda mdl, s: mdl._loss_on(ctx, s, batch))

  def _loss_on(self, ctx: HeadContext, samples: RoISamples,
               batch: Mapping[str, Array]) -> Dict[str, Array]:
    pooled, logits = self._logits(ctx, samples.rois, samples.valid, samples.classes)
    targets = jax.vmap(project_mask_crops, in_axes=(0, 0, 0, 0, None))(
        batch["gt_masks"], batch["gt_boxes"].astype(jnp.float32), samples.gt_index, samples.rois,
        logits.shape[2])
    loss_fn = maskrcnn_loss if self.loss_type == "sigmoid" else maskrcnn_softmax_loss
    per_image = jax.vmap(loss_fn)(logits, self._channel(samples.classes), targets, samples.valid)
    picked = self.class_logits(logits, samples.classes)
    return dict(loss_mask=jnp.mean(per_image), mask_features=pooled, mask_logits=picked,
                mask_probs=jax.nn.sigmoid(picked), mask_targets=targets)


class MaskHead(MaskHeadBase):
  """`fcn`: `layers` x (3x3 conv [+ norm] + ReLU), a 2x2 stride-2 deconv + ReLU, a 1x1 conv to the
  mask channels: masks of size 2S for S x S pooled RoIs (28 x 28 from 14 x 14).

  torchvision's head is `layers=(256,) * 4`; Detectron2's C4 mask head (on res5 features) is
  `layers=(), deconv_channels=256`.
  """
  layers: Sequence[int] = (256, 256, 256, 256)
  """Channels of the 3x3 convs (may be empty: the deconv then reads the pooled features)."""
  dilation: int = 1
  """Dilation of the 3x3 convs."""
  norm: str = "none"
  """Norm after each 3x3 conv (`layers.NORM_TYPES`): 'none' in torchvision v1, 'bn' in v2."""
  deconv_channels: int = 0
  """Output channels of the deconv (`conv5_mask`); 0: `layers[-1]` (needs layers)."""

  def __post_init__(self):
    check_norm(self.norm, "mask_head.norm", self.layers)
    if any(int(ch) < 1 for ch in self.layers):
      raise ValueError(f"mask_head.layers must be positive channel counts, got {self.layers}")
    if int(self.dilation) < 1:
      raise ValueError(f"mask_head.dilation must be >= 1, got {self.dilation}")
    if int(self.deconv_channels) < 0:
      raise ValueError(f"mask_head.deconv_channels must be >= 0, got {self.deconv_channels}")
    if not self.layers and not self.deconv_channels:
      raise ValueError("mask_head.deconv_channels must be > 0 when mask_head.layers is empty "
                       "(0 means layers[-1])")
    super().__post_init__()

  per_label_logits = True

  @nn.compact
  def __call__(self, x, train: bool = False, axis_name=None, mask=None, labels=None):
    """x: [N, S, S, C] pooled features; mask: [N] bool RoIs that count in batch statistics;
    labels: [N] int32 or None.

    Returns mask logits [N, 2S, 2S, mask_channels] float32, or with `labels` [N, 2S, 2S, 1]: each
    RoI's labelled channel only (the 1x1 predictor computes nothing else)."""
    for i, ch in enumerate(self.layers):
      x = Conv(ch, (3, 3), padding=((self.dilation,) * 2,) * 2,
               kernel_dilation=(self.dilation,) * 2, use_bias=self.norm == "none",
               dtype=self.dtype, param_dtype=jnp.float32, name=f"mask_fcn{i + 1}")(x)
      x = nn.relu(Norm(self.norm, dtype=self.dtype, name=f"mask_norm{i + 1}")(
          x, train, axis_name, mask))
    width = self.deconv_channels or self.layers[-1]
    x = nn.relu(ConvTranspose2x2(width, self.dtype, name="conv5_mask")(x))
    return Conv1x1PerLabel(self.mask_channels, self.dtype, name="mask_fcn_logits")(
        x, labels).astype(jnp.float32)


class MLPMaskHead(MaskHeadBase):
  """`mlp`: the paper's fc mask head (Table 2e): the pooled RoI features flattened in (h, w, c)
  order, `mlp_layers` fcs + ReLU (`mask_fc1`, `mask_fc2`, ...), then an fc (`mask_fc_logits`) to
  2S x 2S x mask_channels logits, laid out (h, w, c). The mask side follows the pooled size (28 on
  FPN's 14 x 14 RoIs, 14 on a C4 trunk's 7 x 7).

  Its variables have no torchvision counterpart. A torch fc head that reshapes its output to
  [N, channels, 2S, 2S] converts by permuting the first fc's inputs and the last fc's outputs from
  (c, h, w) to (h, w, c) order.
  """
  mlp_layers: Sequence[int] = (1024, 1024)
  """Widths of the hidden fcs; the paper's 3-layer variant is (1024, 1024, 1024)."""

  def __post_init__(self):
    if not self.mlp_layers or any(int(w) < 1 for w in self.mlp_layers):
      raise ValueError("mask_head.mlp_layers needs at least one fc, each of positive width; got "
                       f"{self.mlp_layers}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False, axis_name=None, mask=None):
    """x: [N, S, S, C] pooled features (train, axis_name and mask unused: no norms).

    Returns mask logits [N, 2S, 2S, mask_channels] float32."""
    n, h, w = x.shape[:3]
    x = x.reshape((n, -1))  # (h, w, c) order
    for j, width in enumerate(self.mlp_layers):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                           name=f"mask_fc{j + 1}")(x))
    shape = (n, 2 * h, 2 * w, self.mask_channels)
    x = nn.Dense(shape[1] * shape[2] * shape[3], dtype=self.dtype, param_dtype=jnp.float32,
                 name="mask_fc_logits")(x)
    return x.reshape(shape).astype(jnp.float32)
