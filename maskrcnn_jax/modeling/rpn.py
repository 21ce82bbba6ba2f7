"""Region proposal network: head, anchors and proposal selection, as torchvision's
`RegionProposalNetwork`."""
from typing import Any, Dict, List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import conv, mask_to_extent
from maskrcnn_jax.ops import anchors as anchor_ops, boxes as box_ops
from maskrcnn_jax.ops.nms import nms

PYRAMID_LEVELS = (2, 3, 4, 5, 6)
"""The FPN's levels (log2 of the stride); a C4 model has the one level `C4_LEVELS`."""
C4_LEVELS = (4,)


class RPNHead(nn.Module):
  """`conv_depth` x (3x3 conv + ReLU) shared over levels, then 1x1 objectness and delta convs."""
  num_anchors: int
  channels: int = 256
  conv_depth: int = 1
  dtype: Any = jnp.float32
  levels: Sequence[int] = PYRAMID_LEVELS
  """The levels (log2 of the strides) of the maps it reads, for `mask_to_extent`."""

  @nn.compact
  def __call__(self, pyramid: List[jnp.ndarray], sizes=None):
    """pyramid: L x [B, H_l, W_l, C] at `levels`; sizes: padded image sizes or None.

    Returns logits L x [B, H_l*W_l*A], deltas L x [B, H_l*W_l*A, 4]."""
    # The first conv keeps the name it had before conv_depth existed, so older checkpoints load.
    shared = [conv(self.channels, 3, 1, 1, dtype=self.dtype, name=f"conv_{i}" if i else "conv")
              for i in range(self.conv_depth)]
    cls = conv(self.num_anchors, 1, dtype=self.dtype, name="cls_logits")
    reg = conv(self.num_anchors * 4, 1, dtype=self.dtype, name="bbox_pred")
    logits, deltas = [], []
    for level, p in zip(self.levels, pyramid):
      t = p
      for c in shared:  # every 3x3 conv reads neighbours: zero what lies past the image's extent
        t = nn.relu(c(mask_to_extent(t, sizes, level)))
      b = p.shape[0]
      logits.append(cls(t).astype(jnp.float32).reshape(b, -1))
      deltas.append(reg(t).astype(jnp.float32).reshape(b, -1, 4))
    return logits, deltas


class RPN(nn.Module):
  """Head + anchors + proposals (inference settings only: training targets are `rpn_sampler`'s).

  Field names follow torchvision's `rpn_*` arguments."""
  anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,))
  """Anchor sizes per feature level (P2..P6; C4 models: one level, e.g. ((32, 64, 128, 256,
  512),), which the builder makes from the per-level sizes)."""
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  """Anchor height/width ratios, the same on every level."""
  pre_nms_topk_train: int = 2000
  """Top-scoring anchors kept per level before NMS, training."""
  pre_nms_topk_test: int = 1000
  """Top-scoring anchors kept per level before NMS, inference."""
  post_nms_topk_train: int = 2000
  """Proposals kept per image after NMS, training."""
  post_nms_topk_test: int = 1000
  """Proposals kept per image after NMS, inference."""
  nms_threshold: float = 0.7
  """IoU threshold of the per-level NMS."""
  min_size: float = 1e-3
  """Proposals narrower or shorter than this (pixels) are dropped."""
  score_threshold: float = 0.0
  """Proposals with sigmoid objectness below this are dropped."""
  channels: int = 256
  """Channels of the head's 3x3 convs (torchvision: the input's, 256 on FPN, 1024 on R50's C4)."""
  conv_depth: int = 1
  """3x3 convs of the head: 1 in torchvision v1, 2 in v2."""
  dtype: Any = jnp.float32
  """Compute dtype of the head."""
  levels: Sequence[int] = PYRAMID_LEVELS
  """The feature levels it reads (log2 of their strides); set by the builder from the backbone."""

  def cells(self):
    return [anchor_ops.cell_anchors(s, self.aspect_ratios) for s in self.anchor_sizes]

  def setup(self):
    cells = self.cells()
    if len({c.shape[0] for c in cells}) != 1:
      raise ValueError("every level needs the same number of anchors per location")
    self.head = RPNHead(cells[0].shape[0], self.channels, self.conv_depth, self.dtype,
                        tuple(self.levels))

  def __call__(self, pyramid: List[jnp.ndarray], image_sizes, padded_sizes,
               train: bool = False) -> Dict[str, jnp.ndarray]:
    """Runs the head and selects proposals.

    Args:
      pyramid: the maps of `levels` ([P2..P6], or [C4]), each [B, H_l, W_l, C].
      image_sizes: [B, 2] int32 (h, w) of each resized image before padding (boxes are clipped
        to it).
      padded_sizes: [B, 2] int32 (h, w) each image is padded to in torchvision's own batching (a
        multiple of 32); equal to the canvas in exact mode. Anchors beyond it are invalid.
      train: selects the *_train top-k sizes.

    Returns a dict:
      objectness: [B, A] float32 logits; deltas: [B, A, 4]; anchors: [B, A, 4] (x1, y1, x2, y2);
      anchor_valid: [B, A] bool; proposals: [B, P, 4]; proposal_scores: [B, P] sigmoid objectness;
      proposal_valid: [B, P] bool, with P = post_nms_topk_{train,test}.
    """
    if not len(self.anchor_sizes) == len(self.levels) == len(pyramid):
      raise ValueError(f"{len(self.anchor_sizes)} anchor sizes and levels {self.levels} for "
                       f"{len(pyramid)} feature maps")
    cells = self.cells()
    logits, deltas = self.head(pyramid, padded_sizes)
    grid_shapes = [p.shape[1:3] for p in pyramid]
    levels = tuple(self.levels)
    anchors, anchor_valid = jax.vmap(
        lambda s: anchor_ops.multilevel_anchors(grid_shapes, levels, (s[0], s[1]), cells))(
            padded_sizes)
    pre_k = self.pre_nms_topk_train if train else self.pre_nms_topk_test
    post_k = self.post_nms_topk_train if train else self.post_nms_topk_test
    sizes = [l.shape[1] for l in logits]
    props, scores, valid = jax.vmap(
        lambda lg, dl, an, av, sz: self._select(lg, dl, an, av, sz, sizes, pre_k, post_k))(
            jnp.concatenate(logits, 1), jnp.concatenate(deltas, 1), anchors, anchor_valid,
            image_sizes)
    return dict(objectness=jnp.concatenate(logits, 1), deltas=jnp.concatenate(deltas, 1),
                anchors=anchors, anchor_valid=anchor_valid, proposals=props,
                proposal_scores=scores, proposal_valid=valid)

  def _select(self, logits, deltas, anchors, anchor_valid, image_size, sizes, pre_k, post_k):
    """One image: per-level top-k, decode, clip, drop small, per-level NMS, top post_k overall."""
    k = min(pre_k, max(sizes))
    sel_boxes, sel_logits, sel_valid = [], [], []
    start = 0
    for n in sizes:
      lg = jax.lax.dynamic_slice_in_dim(logits, start, n)
      av = jax.lax.dynamic_slice_in_dim(anchor_valid, start, n)
      kl = min(pre_k, n)
      top, idx = jax.lax.top_k(jnp.where(av, lg, -jnp.inf), kl)
      idx = idx + start
      ok = anchor_valid[idx]
      bx = box_ops.decode_boxes(jax.lax.stop_gradient(deltas[idx]), anchors[idx])
      pad = k - kl
      sel_boxes.append(jnp.pad(bx, ((0, pad), (0, 0))))
      sel_logits.append(jnp.pad(top, (0, pad), constant_values=-jnp.inf))
      sel_valid.append(jnp.pad(ok, (0, pad)))
      start += n
    boxes = box_ops.clip_boxes(jnp.stack(sel_boxes), image_size[0].astype(jnp.float32),
                               image_size[1].astype(jnp.float32))
    probs = jax.nn.sigmoid(jax.lax.stop_gradient(jnp.stack(sel_logits)))
    valid = (jnp.stack(sel_valid) & box_ops.box_sizes_at_least(boxes, self.min_size)
             & (probs >= self.score_threshold))
    # A level contributes at most post_k boxes to the overall top post_k (its own better boxes
    # come first), so its NMS stops there.
    keep, keep_valid = jax.vmap(
        lambda b, s, v: nms(b, s, self.nms_threshold, min(k, post_k), valid=v))(
            boxes, probs, valid)
    boxes = jnp.take_along_axis(boxes, keep[..., None], axis=1).reshape(-1, 4)
    probs = jnp.take_along_axis(probs, keep, axis=1).reshape(-1)
    keep_valid = keep_valid.reshape(-1)
    n_out = min(post_k, boxes.shape[0])
    top, idx = jax.lax.top_k(jnp.where(keep_valid, probs, -1.0), n_out)
    out_boxes, out_valid = boxes[idx], keep_valid[idx]
    pad = post_k - n_out
    return (jnp.pad(out_boxes, ((0, pad), (0, 0))),
            jnp.pad(jnp.where(out_valid, top, 0.0), (0, pad)),
            jnp.pad(out_valid, (0, pad)))
