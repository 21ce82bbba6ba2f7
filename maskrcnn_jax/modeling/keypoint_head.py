"""The keypoint head of Keypoint R-CNN (`keypoint_head.type = 'rcnn'`), torchvision's
`KeypointRCNNHeads` + `KeypointRCNNPredictor`: human pose (or any named point set) from RoIs
pooled 14 x 14 (`keypoint_pooler`), trained on the foreground RoIs (`keypoint_sampler`).

Each keypoint is a heatmap over the RoI (56 x 56 for 14 x 14 RoIs): training is a softmax
cross-entropy over its cells against the cell of the ground-truth point
(`ops.keypoints.keypoints_to_heatmap`, `losses.keypoint_loss`); inference resizes each RoI's
heatmaps to its box's size (bicubic) and takes the argmax (`ops.keypoints.heatmaps_to_keypoints`).
"""
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import Conv
from maskrcnn_jax.modeling.losses import keypoint_loss
from maskrcnn_jax.modeling.poolers import RoIPooler
from maskrcnn_jax.modeling.roi_heads import (
    HeadContext,
    RoIHead,
    check_train_buckets,
    loss_on_slot_bucket,
)
from maskrcnn_jax.modeling.samplers import RoISamples
from maskrcnn_jax.ops.keypoints import (
    heatmaps_to_keypoints,
    keypoints_to_heatmap,
    upsample2x_bilinear,
)
from maskrcnn_jax.types import Array

# torchvision's initialization: Kaiming-normal (fan out, ReLU) convs and deconv, zero biases. The
# deconv's torch weight is [in, out, 4, 4], whose "fan out" is in x 16: flax's fan_in of its
# [4, 4, in, out] kernel.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_DECONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class KeypointHead(RoIHead):
  """`rcnn`: `conv_layers` x (3x3 conv + ReLU) (`kps_fcn1..`), a 4x4 stride-2 transposed conv to
  one map per keypoint (`kps_score_lowres`: torch's ConvTranspose2d(padding=1), its kernel stored
  flipped, [4, 4, in, K], as a correlation over the stride-dilated input), then bilinear x2: heatmap
  logits [N, K, 4S, 4S] for S x S pooled RoIs. torchvision's head is `conv_layers=(512,) * 8`.

  Keypoints are class-independent (Keypoint R-CNN detects one class, person); the head runs on
  every detection (inference) and every foreground RoI (training).
  """
  batch_keys = ("gt_keypoints",)
  prediction_keys = ("keypoints", "keypoints_scores")
  point_keys = ("keypoints",)
  loss_names = ("loss_keypoint",)
  eval_task = "keypoints"

  num_classes: int
  pooler: RoIPooler = RoIPooler(output_size=14)
  """The `keypoint_pooler` section."""
  num_keypoints: int = 17
  """K (COCO's person keypoints: 17); the dataset's must agree."""
  conv_layers: Sequence[int] = (512,) * 8
  """Channels of the 3x3 convs (torchvision: eight of 512; a slimmer head trains faster)."""
  dtype: Any = jnp.float32
  train_buckets: Tuple[int, ...] = (32, 64)
  """`keypoint_head.train_buckets`: in training, the head runs on the smallest of these slot counts
  per image (or on all `keypoint_sampler.num_rois` slots) that holds every image's foreground RoIs
  (`roi_heads.loss_on_slot_bucket`: picked on the device, equal results; TPU programs always run
  all slots). () = always all slots."""

  def __post_init__(self):
    check_train_buckets(self.train_buckets, "keypoint_head")
    if not isinstance(self.num_keypoints, int) or self.num_keypoints < 1:
      raise ValueError(f"keypoint_head.num_keypoints must be an int >= 1, got "
                       f"{self.num_keypoints!r}")
    if not self.conv_layers or any(int(c) < 1 for c in self.conv_layers):
      raise ValueError("keypoint_head.conv_layers needs at least one conv, each of positive "
                       f"width; got {self.conv_layers}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, S, S, C] pooled RoI features -> heatmap logits [N, K, 4S, 4S] float32."""
    for i, ch in enumerate(self.conv_layers):
      x = nn.relu(Conv(ch, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_CONV_INIT,
                       dtype=self.dtype, param_dtype=jnp.float32, name=f"kps_fcn{i + 1}")(x))
    x = nn.ConvTranspose(self.num_keypoints, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                         kernel_init=_DECONV_INIT, dtype=self.dtype, param_dtype=jnp.float32,
                         name="kps_score_lowres")(x)
    x = jnp.transpose(x.astype(jnp.float32), (0, 3, 1, 2))  # [N, K, 2S, 2S]
    return upsample2x_bilinear(x)

  def _heatmaps(self, ctx: HeadContext, boxes: Array) -> Array:
    """boxes [B, N, 4] canvas pixels -> heatmap logits [B, N, K, 4S, 4S]."""
    pooled = ctx.pool(self.pooler, boxes)
    b, n = pooled.shape[:2]
    maps = self(pooled.reshape((b * n,) + pooled.shape[2:]))
    return maps.reshape((b, n) + maps.shape[1:])

  def predict(self, ctx: HeadContext, detections: Mapping[str, Array]) -> Dict[str, Array]:
    """Returns keypoints [B, D, K, 3] (x, y, 1) canvas pixels and keypoints_scores [B, D, K] (the
    resized heatmap logit at each point); zeros on invalid detections."""
    boxes = detections["boxes"]
    b, d = boxes.shape[:2]
    maps = self._heatmaps(ctx, boxes)
    points, scores = heatmaps_to_keypoints(
        maps.reshape((b * d,) + maps.shape[2:]), boxes.reshape(-1, 4), max(ctx.canvas_size()))
    valid = detections["valid"]
    points = jnp.where(valid[..., None, None], points.reshape(b, d, -1, 3), 0.0)
    scores = jnp.where(valid[..., None], scores.reshape(b, d, -1), 0.0)
    return dict(keypoints=points, keypoints_scores=scores)

  def loss(self, ctx: HeadContext, samples: RoISamples,
           batch: Mapping[str, Array]) -> Dict[str, Array]:
    """`losses.keypoint_loss` over the valid keypoints of the sampled foreground RoIs of the whole
    (device) batch, as torchvision normalizes; also keypoint_targets [B, P, K] and
    keypoint_valid [B, P, K]."""
    gt = batch.get("gt_keypoints")
    if gt is None:
      raise ValueError("a model with a keypoint head needs gt_keypoints to train (a dataset "
                       "with keypoints)")
    if gt.ndim != 4 or gt.shape[-2:] != (self.num_keypoints, 3):
      raise ValueError(f"gt_keypoints must be [B, M, {self.num_keypoints}, 3] (x, y, v) for "
                       f"keypoint_head.num_keypoints={self.num_keypoints}; got {gt.shape}")
    return loss_on_slot_bucket(self, ctx, samples, self.train_buckets,
                               lambda mdl, s: mdl._loss_on(ctx, s, gt))

  def _loss_on(self, ctx: HeadContext, samples: RoISamples, gt: Array) -> Dict[str, Array]:
    maps = self._heatmaps(ctx, samples.rois)
    points = jnp.take_along_axis(gt.astype(jnp.float32), samples.gt_index[:, :, None, None],
                                 axis=1)  # [B, P, K, 3]
    targets, valid = jax.vmap(keypoints_to_heatmap, in_axes=(0, 0, None))(
        points, samples.rois, maps.shape[-1])
    valid = valid & samples.valid[..., None]
    return dict(loss_keypoint=keypoint_loss(maps, targets, valid), keypoint_targets=targets,
                keypoint_valid=valid)
