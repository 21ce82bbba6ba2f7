"""Mask ops: class-channel selection, mask targets from ground-truth crops, and pasting per-RoI
mask probabilities into the full image, as torchvision does it."""
import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.indexing import take_one_hot
from maskrcnn_jax.ops.roi_align import roi_align_batched
from maskrcnn_jax.types import Array


def select_class_channel(x: Array, labels: Array) -> Array:
  """The channel of each RoI's class: per-class maps, or the one class-agnostic channel.

  Used by the mask loss and the mask inference alike (and by any head with per-class outputs).

  Args:
    x: [N..., S, S, K] per-class maps of N... RoIs; K = 1 means class-agnostic (that channel serves
      every class).
    labels: [N...] int32 class of each RoI (ignored when K = 1).

  Returns:
    [N..., S, S].
  """
  spatial = x.ndim - labels.ndim - 1
  if spatial < 0 or x.shape[:labels.ndim] != labels.shape:
    raise ValueError(f"x {x.shape} must be labels' shape {labels.shape} + [..., K]")
  if x.shape[-1] == 1:
    return x[..., 0]
  return take_one_hot(x, labels.reshape(labels.shape + (1,) * spatial), axis=-1)


def project_mask_crops(crops: Array, gt_boxes: Array, gt_index: Array, rois: Array,
                       size: int, method: str = "auto") -> Array:
  """Mask targets: each RoI's ground-truth crop resampled into the RoI, as `project_masks_on_boxes`.

  The crops cover their ground-truth boxes (crop pixel (i, j) samples the box at ((j + .5) / S,
  (i + .5) / S) of its extent), so a RoI maps into crop coordinates by an affine map and RoIAlign
  (aligned=True) samples it there; outside the crop the target is 0. torchvision cuts targets from
  the full mask with `roi_align(aligned=False)`, which reads pixel k's value at coordinate k rather
  than k + 0.5; the RoI is shifted by half a pixel so that the targets follow that convention.

  Args:
    crops: [M, S, S] float in [0, 1]; gt_boxes: [M, 4] (x1, y1, x2, y2); gt_index: [P] int32;
    rois: [P, 4] (x1, y1, x2, y2); size: output side (28).
    method: RoIAlign's form ("auto": gathers on CPU; on accelerators the einsum form, here one
      matmul pair per RoI with its whole crop: every RoI fits the crop-sized window).

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
                          sampling_ratio=2, aligned=True, method=method)
  return out[:, 0, ..., 0]


def _crop_overlaps(lo: Array, hi: Array, a: Array, b: Array, size: int) -> Array:
  """[P, size] length of the overlap of each of `size` equal cells tiling [lo, hi] with [a, b]
  (all [P])."""
  edges = lo[:, None] + (hi - lo)[:, None] * (jnp.arange(size + 1, dtype=jnp.float32) / size)
  return jnp.clip(jnp.minimum(edges[:, 1:], b[:, None]) - jnp.maximum(edges[:, :-1], a[:, None]),
                  0.0, None)


def mask_iou_targets(mask_probs: Array, mask_targets: Array, rois: Array, gt_masks: Array,
                     gt_boxes: Array, gt_index: Array, threshold: float = 0.5) -> Array:
  """MaskIoU targets (Mask Scoring R-CNN): the IoU of each RoI's binarized predicted mask with its
  whole ground-truth instance, counting the part of the instance outside the RoI.

  Everything is measured in cells of the RoI's G x G mask grid (G = 2S; a cell is
  roi_w * roi_h / G^2 pixels), as the official `MaskRCNNLossComputation` does:

    pred       = mask_probs > threshold (the official `mask_logits > 0`)
    inter      = sum(pred * t)                 t = mask_targets: the fraction of each cell the
                                               instance covers, so sums are areas
    ratio      = inside / full                 the instance's area inside the RoI over its whole
                                               area, both in pixels, from its crop (below)
    full_cells = sum(t) / max(ratio, 1e-10)    the whole instance's area in cells
    iou        = max(inter, 0) / max(sum(pred) + full_cells - inter, 1)

  The crop `gt_masks[m]` tiles its box: crop pixel (i, j) is the rectangle of side
  (box_w / Sc, box_h / Sc) at (x1 + j box_w / Sc, y1 + i box_h / Sc) holding coverage
  crop[i, j], so full = mean(crop) * box_w * box_h, and inside sums each crop pixel's coverage
  times its area inside the RoI. The RoI is shifted by half a pixel there, as in
  `project_mask_crops`, so that `inside` measures the part of the instance the targets hold; an
  instance wholly inside the RoI then has ratio 1 and full_cells = sum(t) exactly, and one cut by
  the RoI is not over-credited for the part the prediction cannot see. (The official code finds
  the same ratio from the instance's polygons.) No gradient flows through the targets.

  Args:
    mask_probs: [P, G, G] predicted mask probabilities of each RoI's ground-truth class.
    mask_targets: [P, G, G] float in [0, 1] the RoIs' mask targets (`project_mask_crops` of the
      same crops, boxes, gt_index and rois).
    rois: [P, 4] float32 (x1, y1, x2, y2) pixels.
    gt_masks: [M, Sc, Sc] float in [0, 1] ground-truth instance crops covering their boxes.
    gt_boxes: [M, 4] float32 (x1, y1, x2, y2) pixels, the crops' boxes.
    gt_index: [P] int32 each RoI's ground-truth instance.
    threshold: probabilities above it are foreground.

  Returns:
    [P] float32 in [0, 1]: 0 for an empty prediction, an empty instance or a degenerate RoI.
  """
  if mask_probs.ndim != 3 or mask_probs.shape != mask_targets.shape:
    raise ValueError(f"mask_probs {mask_probs.shape} and mask_targets {mask_targets.shape} must "
                     "both be [P, G, G]")
  p = mask_probs.shape[0]
  if rois.shape != (p, 4) or gt_index.shape != (p,):
    raise ValueError(f"rois must be [P, 4] and gt_index [P] with P = {p}, got {rois.shape} and "
                     f"{gt_index.shape}")
  if gt_masks.ndim != 3 or gt_boxes.shape != (gt_masks.shape[0], 4):
    raise ValueError(f"gt_masks must be [M, Sc, Sc] and gt_boxes [M, 4], got {gt_masks.shape} "
                     f"and {gt_boxes.shape}")
  f32 = jnp.float32
  sg = jax.lax.stop_gradient
  pred = (sg(mask_probs).astype(f32) > threshold).astype(f32)
  t = sg(mask_targets).astype(f32)
  g = sg(gt_boxes).astype(f32)[gt_index]
  crops = sg(gt_masks).astype(f32)[gt_index]
  r = sg(rois).astype(f32) + 0.5
  sy, sx = crops.shape[-2:]
  ox = _crop_overlaps(g[:, 0], g[:, 2], r[:, 0], r[:, 2], sx)  # [P, Sx]
  oy = _crop_overlaps(g[:, 1], g[:, 3], r[:, 1], r[:, 3], sy)  # [P, Sy]
  inside = jnp.einsum("pij,pi,pj->p", crops, oy, ox, precision=jax.lax.Precision.HIGHEST)
  full = jnp.mean(crops, axis=(1, 2)) * (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
  ratio = jnp.where(full > 0, jnp.minimum(inside / jnp.where(full > 0, full, 1.0), 1.0), 0.0)
  full_cells = jnp.sum(t, axis=(1, 2)) / jnp.maximum(ratio, 1e-10)
  inter = jnp.sum(pred * t, axis=(1, 2))
  union = jnp.maximum(jnp.sum(pred, axis=(1, 2)) + full_cells - inter, 1.0)
  return jnp.maximum(inter, 0.0) / union


def _resize_rows(dst: Array, out_size: Array, in_size: int) -> Array:
  """Bilinear (align_corners=False) weights that resize `in_size` samples to `out_size`.

  Args:
    dst: [L] int32 destination indices (may fall outside [0, out_size): those rows are zero).
    out_size: scalar int32 >= 1, the destination length (traced; one per RoI).
    in_size: static source length.

  Returns:
    [L, in_size] float32, two non-zeros per valid row, as `F.interpolate(mode='bilinear')`.
  """
  scale = jnp.float32(in_size) / out_size.astype(jnp.float32)
  src = jnp.maximum(scale * (dst.astype(jnp.float32) + 0.5) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  lam = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  i1 = i0 + (i0 < in_size - 1).astype(jnp.int32)
  cols = jnp.arange(in_size)
  w = ((cols[None, :] == i0[:, None]) * (1.0 - lam)[:, None]
       + (cols[None, :] == i1[:, None]) * lam[:, None])
  inside = (dst >= 0) & (dst < out_size)
  return jnp.where(inside[:, None], w, 0.0).astype(jnp.float32)


def paste_masks(masks: Array, boxes: Array, height: int, width: int, padding: int = 1) -> Array:
  """Pastes RoI masks into an image canvas, exactly as torchvision's `paste_masks_in_image`.

  Each `S x S` mask is zero-padded by `padding`, its box enlarged by `(S + 2 * padding) / S` about
  its centre and truncated to integers, the padded mask resized bilinearly (align_corners=False) to
  the integer box size `(x2 - x1 + 1, y2 - y1 + 1)`, and written at the box's place; pixels outside
  every box stay 0. The canvas may be larger than the image (bucketed inference): pixels beyond the
  image are then simply cropped by the caller, since torchvision's clipping only removes those.

  Args:
    masks: [N, S, S] float mask probabilities (one channel per RoI, already class-selected).
    boxes: [N, 4] float32 (x1, y1, x2, y2) in the canvas' pixel frame.
    height, width: static canvas size.
    padding: torchvision's 1.

  Returns:
    [N, height, width] float32.
  """
  if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
    raise ValueError(f"masks must be [N, S, S], got {masks.shape}")
  if boxes.shape != (masks.shape[0], 4):
    raise ValueError(f"boxes must be [N, 4] matching masks, got {boxes.shape}")
  s = masks.shape[-1]
  m = s + 2 * padding
  scale = float(m) / s
  boxes = boxes.astype(jnp.float32)
  w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * jnp.float32(scale)
  h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * jnp.float32(scale)
  x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
  y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
  # float -> int64 in torch truncates toward zero.
  x1 = jnp.trunc(x_c - w_half).astype(jnp.int32)
  x2 = jnp.trunc(x_c + w_half).astype(jnp.int32)
  y1 = jnp.trunc(y_c - h_half).astype(jnp.int32)
  y2 = jnp.trunc(y_c + h_half).astype(jnp.int32)
  bw = jnp.maximum(x2 - x1 + 1, 1)
  bh = jnp.maximum(y2 - y1 + 1, 1)
  padded = jnp.pad(masks.astype(jnp.float32), ((0, 0), (padding, padding), (padding, padding)))
  ys = jnp.arange(height, dtype=jnp.int32)
  xs = jnp.arange(width, dtype=jnp.int32)
  ry = jax.vmap(lambda o, n: _resize_rows(ys - o, n, m))(y1, bh)  # [N, H, m]
  rx = jax.vmap(lambda o, n: _resize_rows(xs - o, n, m))(x1, bw)  # [N, W, m]
  hi = jax.lax.Precision.HIGHEST
  cols = jnp.einsum("nab,nwb->naw", padded, rx, precision=hi)  # [N, m, W]
  return jnp.einsum("nha,naw->nhw", ry, cols, precision=hi)
