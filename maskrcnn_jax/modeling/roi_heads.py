"""The RoI-head seam: the context every head receives, the base of the heads after the box head,
the box head itself and its post-processing.

Every head after the box head (`mask_head`, and any head registered with
`builder.register_roi_head`) subclasses `RoIHead` and has two entry points: `predict` on the
detections and `loss` on its sampled RoIs, returning `{"loss_<name>": ...}`. The detector sums every
`loss_*` a head returns into the objective, so no head's loss can be left out.
"""
from typing import Any, Callable, ClassVar, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.modeling.layers import Norm, check_norm, conv
from maskrcnn_jax.modeling.poolers import RoIPooler
from maskrcnn_jax.modeling.samplers import RoISamples
from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops.nms import batched_nms
from maskrcnn_jax.types import Array


class HeadContext(NamedTuple):
  """What the detector hands every RoI head (one per forward pass).

  features: {level: [B, H_l, W_l, C]} the backbone's maps the poolers read (P2..P6 for FPN, C4
    alone for C4 models).
  padded_sizes: [B, 2] int32 each image's own padded size within the canvas (see
    `layers.mask_to_extent`), or None (the canvas).
  train: training forward (batch statistics in batch-norm layers).
  axis_name: the data axis batch statistics are averaged over in training, or None.
  trunk: the shared RoI trunk (e.g. C4's res5 stage), applied to pooled features by `pool`, or
    None.
  outputs: {head section: everything that head's `predict` or `loss` returned}, for heads that
    read another head's results (filled in head order).
  """
  features: Mapping[int, Array]
  padded_sizes: Optional[Array]
  train: bool
  axis_name: Optional[str]
  trunk: Optional[Callable] = None
  outputs: Optional[Dict[str, Dict[str, Array]]] = None

  def canvas_size(self) -> Tuple[int, int]:
    """(height, width) of the padded image canvas (static), from the finest feature map."""
    level = min(self.features)
    h, w = self.features[level].shape[1:3]
    return h * 2 ** level, w * 2 ** level

  def pool(self, pooler: RoIPooler, boxes: Array) -> Array:
    """boxes [B, N, 4] (x1, y1, x2, y2) canvas pixels -> pooled [B, N, S, S, C]; through the
    shared trunk, if any (C4 models: res5's [B, N, ceil(S/2), ceil(S/2), C5])."""
    x = pooler(self.features, boxes, self.padded_sizes)
    if self.trunk is not None:
      x = self.trunk(x, self.train, self.axis_name)
    return x


class RoIHead(nn.Module):
  """Base of the heads after the box head. A subclass adds its fields (architecture only, and a
  `pooler: RoIPooler` when it pools its own features), its `@nn.compact __call__`, and the two
  entry points the detector calls:

    predict(ctx: HeadContext, detections) -> dict
        inference on the detections (boxes [B, D, 4] canvas pixels, labels [B, D] int32, scores
        [B, D], valid [B, D] bool, plus what earlier heads added); returns at least
        `prediction_keys`, each [B, D, ...], which join the detections;
    loss(ctx: HeadContext, samples: RoISamples, batch) -> dict
        training on its sampled RoIs ([B, R] each, from its sampler section; the box head's RoI
        samples when it has none); returns `loss_names` (float32 scalars, means over images) and
        anything later heads read (`ctx.outputs[section]`).

  The class attributes below describe the head to the builder, the training step and the
  evaluation.
  """
  requires: ClassVar[Tuple[str, ...]] = ()
  """Config sections of other heads this one reads (they must be on and run before it; a
  build-time error names both otherwise)."""
  batch_keys: ClassVar[Tuple[str, ...]] = ()
  """Batch entries `loss` reads beyond images, sizes and boxes (e.g. 'gt_masks')."""
  prediction_keys: ClassVar[Tuple[str, ...]] = ()
  """Keys `predict` adds to the detections (and to `predict`'s results, e.g. 'masks')."""
  point_keys: ClassVar[Tuple[str, ...]] = ()
  """Those of `prediction_keys` that hold points [..., P, 2 + n] whose [..., 0] and [..., 1] are
  x and y canvas pixels (e.g. 'keypoints'): inference scales them to the original image, as it
  does boxes."""
  loss_names: ClassVar[Tuple[str, ...]] = ()
  """The `loss_*` keys `loss` returns: exactly these (checked), each named by no other head."""
  eval_task: ClassVar[Optional[str]] = None
  """The COCO evaluation its predictions feed (e.g. 'segm'; one of
  `evaluation.coco_eval.IOU_TYPES`), or None."""


def check_train_buckets(buckets, section: str) -> None:
  """Raises ValueError unless `buckets` (`<section>.train_buckets`) is a tuple of ints >= 1."""
  if (not isinstance(buckets, (tuple, list))
      or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in buckets)):
    raise ValueError(f"{section}.train_buckets must be a tuple of slot counts >= 1, got "
                     f"{buckets!r}")


def loss_on_slot_bucket(head: nn.Module, ctx: HeadContext, samples: RoISamples,
                        buckets: Sequence[int],
                        run: Callable[[nn.Module, RoISamples], Dict[str, Array]]
                        ) -> Dict[str, Array]:
  """A foreground head's training pass on the first n slots of each image's samples, n the
  smallest of `buckets` (or all slots) that holds every image's valid RoIs; picked on the device
  (`nn.switch`, no host sync). Valid RoIs must come first in the slots (`ForegroundSampler`'s
  order), so the result equals `run` on all slots: losses, gradients and batch statistics (norms
  that count only valid RoIs).

  samples: [B, R] each; run(head, samples [B, n]) -> dict of scalars and per-slot arrays
  [B, n, ...], the latter zero-padded here to [B, R, ...]. TPU programs get a constant index (all
  slots: static shapes; XLA folds the conditional); C4 models (a shared trunk outside the head)
  always run all slots.
  """
  slots = samples.rois.shape[1]
  sizes = sorted({int(n) for n in buckets if n < slots}) + [slots]

  def on(mdl, n):
    out = run(mdl, RoISamples(*(x[:, :n] for x in samples)))
    pad = lambda x: (jnp.pad(x, [(0, 0), (0, slots - n)] + [(0, 0)] * (x.ndim - 2))
                     if x.ndim >= 2 and x.shape[1] == n else x)
    return {k: pad(v) for k, v in out.items()}

  if len(sizes) == 1 or ctx.trunk is not None:
    return on(head, slots)
  count = jnp.max(jnp.sum(samples.valid.astype(jnp.int32), axis=1))
  index = lax.platform_dependent(
      count, tpu=lambda c: jnp.int32(len(sizes) - 1),
      default=lambda c: jnp.searchsorted(jnp.asarray(sizes, jnp.int32), c).astype(jnp.int32))
  return nn.switch(index, [lambda mdl, n=n: on(mdl, n) for n in sizes], head)


BOX_HEAD_TYPES = ("conv_fc",)


class BoxHead(nn.Module):
  """`conv_fc`: `conv_layers` 3x3 convs (+ norm, ReLU), flatten, `fc_layers` fcs (+ ReLU), then the
  FastRCNNPredictor (cls_score, bbox_pred).

  torchvision v1's TwoMLPHead is `conv_layers=(), fc_layers=(1024, 1024)`; v2's FastRCNNConvFCHead
  `conv_layers=(256,) * 4, fc_layers=(1024,), norm='bn'`.
  """
  num_classes: int
  type: str = "conv_fc"
  conv_layers: Sequence[int] = ()
  """Channels of the 3x3 convs before the fcs."""
  fc_layers: Sequence[int] = (1024, 1024)
  """Widths of the fcs (named fc6, fc7, ... as torchvision's TwoMLPHead); may be empty (C4 models
  as Detectron2: the predictor reads the averaged res5 features)."""
  norm: str = "none"
  """Norm after each conv (`layers.NORM_TYPES`)."""
  bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
  """Box coder weights (wx, wy, ww, wh) of the predicted deltas, for targets and decoding."""
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.type not in BOX_HEAD_TYPES:
      raise ValueError(f"box_head.type must be one of {BOX_HEAD_TYPES}, got {self.type!r}")
    check_norm(self.norm, "box_head.norm", self.conv_layers)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False, axis_name: Optional[str] = None, mask=None):
    """x: [..., S, S, C] pooled features; mask: [...] bool RoIs that count in batch statistics.

    Returns logits [..., K], deltas [..., K, 4] (float32)."""
    lead = x.shape[:-3]
    if self.conv_layers:
      x = x.reshape((-1,) + x.shape[-3:])
      m = None if mask is None else mask.reshape(-1)
      for i, ch in enumerate(self.conv_layers):
        x = conv(ch, 3, 1, 1, use_bias=self.norm == "none", dtype=self.dtype,
                 name=f"conv{i + 1}")(x)
        x = nn.relu(Norm(self.norm, dtype=self.dtype, name=f"norm{i + 1}")(x, train, axis_name, m))
    x = x.reshape(lead + (-1,))  # (h, w, c) order; the converter permutes torch's (c, h, w)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    for j, width in enumerate(self.fc_layers):
      x = nn.relu(dense(width, f"fc{6 + j}")(x))
    logits = dense(self.num_classes, "cls_score")(x).astype(jnp.float32)
    deltas = dense(self.num_classes * 4, "bbox_pred")(x).astype(jnp.float32)
    return logits, deltas.reshape(lead + (self.num_classes, 4))


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
      dict boxes [D, 4], scores [D], labels [D] int32 (1..K-1), valid [D] bool; D
      detections_per_image.
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
