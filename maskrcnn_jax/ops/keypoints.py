"""Keypoint ops, as torchvision's Keypoint R-CNN: heatmap targets from ground-truth points, the
bilinear x2 upsampling of the keypoint predictor, and the decoding of heatmaps into points (a
bicubic resize of each RoI's heatmaps to its box's size, then the argmax).

Keypoints are `[..., K, 3]` (x, y, v) in pixels (v: 0 not labelled, 1 labelled but occluded, 2
visible, as COCO); heatmaps are per-RoI logits `[N, K, S, S]` over the RoI's box split into S x S
cells.
"""
from typing import Tuple

import jax
import jax.numpy as jnp

from maskrcnn_jax.types import Array


def keypoints_to_heatmap(keypoints: Array, rois: Array, heatmap_size: int) -> Tuple[Array, Array]:
  """Heatmap targets: the flat index of the cell of each point in its RoI, as torchvision's
  `keypoints_to_heatmap`.

  x is mapped to floor((x - x1) * S / (x2 - x1)) (float32), y likewise; a point exactly on the
  RoI's right (bottom) edge goes to the last column (row). A point is a target (valid) when it is
  labelled (v > 0: occluded points count, as in torchvision) and its cell lies inside the RoI.

  Args:
    keypoints: [N, K, 3] (x, y, v) pixels: the ground-truth points of each RoI's object.
    rois: [N, 4] (x1, y1, x2, y2) pixels, the same frame.
    heatmap_size: S.

  Returns:
    targets [N, K] int32 in [0, S^2) (y * S + x; 0 where not valid), valid [N, K] bool. In a RoI
    of zero width only points on its edge (x == x2) are valid, in the last column, as in
    torchvision; the others are not (torchvision casts NaN there, which is undefined); likewise
    for zero height.
  """
  s = int(heatmap_size)
  rois = rois.astype(jnp.float32)
  kp = keypoints.astype(jnp.float32)
  x1, y1, x2, y2 = (rois[:, i:i + 1] for i in range(4))
  x, y = kp[..., 0], kp[..., 1]
  fx = jnp.floor((x - x1) * (s / (x2 - x1)))
  fy = jnp.floor((y - y1) * (s / (y2 - y1)))
  fx = jnp.where(x == x2, s - 1, fx)
  fy = jnp.where(y == y2, s - 1, fy)
  inside = (fx >= 0) & (fy >= 0) & (fx < s) & (fy < s)  # False for NaN / inf
  valid = inside & (kp[..., 2] > 0)
  ix = jnp.where(valid, fx, 0).astype(jnp.int32)
  iy = jnp.where(valid, fy, 0).astype(jnp.int32)
  return iy * s + ix, valid


def upsample2x_bilinear(x: Array) -> Array:
  """`F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)` on [..., H, W]:
  output column 2j reads 0.25 x[j - 1] + 0.75 x[j], column 2j + 1 0.75 x[j] + 0.25 x[j + 1]
  (indices clamped at the borders), rows likewise; columns first, as torch's kernel sums. Written
  with shifted slices (no gathers, so its gradient is no scatter).

  Returns [..., 2H, 2W] of x's dtype."""
  def along(v, axis):
    n = v.shape[axis]
    take = lambda start, stop: jax.lax.slice_in_dim(v, start, stop, axis=axis)
    prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)  # x[j - 1], clamped
    nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)  # x[j + 1], clamped
    even = prev * 0.25 + v * 0.75
    first = (jnp.arange(n) == 0).reshape((n,) + (1,) * (v.ndim - 1 - axis))
    even = jnp.where(first, v, even)  # output 0 reads source -0.25, clamped to 0: x[0]
    odd = v * 0.75 + nxt * 0.25
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(v.shape[:axis] + (2 * n,) + v.shape[axis + 1:])
  return along(along(x, x.ndim - 1), x.ndim - 2)


def _cubic_coefficients(t: Array) -> Array:
  """torch's `get_cubic_upsample_coefficients` (A = -0.75) for fractions t [...] -> [..., 4]."""
  a = jnp.float32(-0.75)

  def conv1(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def conv2(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  t = t.astype(jnp.float32)
  return jnp.stack([conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)], axis=-1)


def _cubic_taps(out_size: Array, in_size: int, grid: int) -> Tuple[Array, Array]:
  """torch's bicubic (align_corners=False) source taps for outputs 0..grid-1 of a resize from
  `in_size` to the dynamic `out_size`: indices [grid, 4] int32 (clamped to the input) and weights
  [grid, 4] float32. The source coordinate is scale * (d + 0.5) - 0.5 with scale = in / out in
  float32, not clamped at 0 (torch's cubic rule)."""
  scale = jnp.float32(in_size) / out_size.astype(jnp.float32)
  real = scale * (jnp.arange(grid, dtype=jnp.float32) + 0.5) - 0.5
  idx = jnp.minimum(jnp.floor(real), in_size - 1)
  t = jnp.clip(real - idx, 0.0, 1.0)
  taps = idx.astype(jnp.int32)[:, None] + jnp.arange(-1, 3)[None, :]
  return jnp.clip(taps, 0, in_size - 1), _cubic_coefficients(t)


def _weighted_taps(gathered, weights):
  """sum_j gathered[j] * weights[j], accumulated in tap order as torch's kernel does."""
  out = gathered[0] * weights[0]
  for j in range(1, 4):
    out = out + gathered[j] * weights[j]
  return out


def _decode_on_grid(maps: Array, out_h: Array, out_w: Array, grid: int) -> Tuple[Array, Array]:
  """One RoI: maps [K, H, W] resized bicubically to (out_h, out_w) <= (grid, grid), evaluated on a
  grid x grid canvas masked to the output; returns the argmax (y, x) [K] int32 each and the value
  there [K]."""
  k, h, w = maps.shape
  ix, wx = _cubic_taps(out_w, w, grid)  # [G, 4]
  iy, wy = _cubic_taps(out_h, h, grid)
  maps = maps.astype(jnp.float32)
  rows = _weighted_taps([maps[:, :, ix[:, j]] for j in range(4)],
                        [wx[:, j] for j in range(4)])  # [K, H, G]: each input row along x
  full = _weighted_taps([rows[:, iy[:, j], :] for j in range(4)],
                        [wy[:, j, None] for j in range(4)])  # [K, G, G]
  g = jnp.arange(grid)
  inside = (g[:, None] < out_h) & (g[None, :] < out_w)
  flat = jnp.where(inside, full, -jnp.inf).reshape(k, grid * grid)
  pos = jnp.argmax(flat, axis=1)  # the first maximum in row-major order, as torch's argmax
  score = jnp.take_along_axis(flat, pos[:, None], axis=1)[:, 0]
  return (pos // grid).astype(jnp.int32), (pos % grid).astype(jnp.int32), score


def decode_grids(max_size: int, smallest: int = 64) -> Tuple[int, ...]:
  """The square canvases `heatmaps_to_keypoints` evaluates a RoI's resized heatmaps on: doubling
  from `smallest`, the last one `max_size`."""
  max_size = int(max_size)
  if max_size < 1:
    raise ValueError(f"max_size must be >= 1, got {max_size}")
  grids = []
  g = int(smallest)
  while g < max_size:
    grids.append(g)
    g *= 2
  return tuple(grids) + (max_size,)


def heatmaps_to_keypoints(maps: Array, rois: Array, max_size: int) -> Tuple[Array, Array]:
  """Keypoints from heatmaps, as torchvision's `heatmaps_to_keypoints`.

  Per RoI of width w = max(x2 - x1, 1) and height h (likewise), its heatmaps are resized to
  ceil(h) x ceil(w) (bicubic, A = -0.75, align_corners=False, no antialias: torch's
  `F.interpolate`), and each keypoint goes to its map's first maximum (row-major): x = x1 +
  (col + 0.5) * w / ceil(w), y likewise; its score is the resized map's value there.

  Static shapes: the resized maps of each RoI are evaluated on the smallest square canvas of
  `decode_grids(max_size)` that holds them, masked to ceil(h) x ceil(w), one RoI at a time
  (`lax.map`, the canvas picked by `lax.switch`), so the work follows each box's size. Exact for
  boxes with ceil(w), ceil(h) <= max_size (boxes clipped to an image of that size are); a larger
  box is decoded on the largest canvas (its points then lie in its top-left max_size x max_size).

  Args:
    maps: [N, K, S, S] heatmap logits of N RoIs.
    rois: [N, 4] (x1, y1, x2, y2) pixels.
    max_size: static bound on ceil(w) and ceil(h), e.g. the image canvas' longer side.

  Returns:
    keypoints [N, K, 3] float32 (x, y, 1) pixels, scores [N, K] float32.
  """
  n, k = maps.shape[:2]
  grids = decode_grids(max_size)
  rois = rois.astype(jnp.float32)
  widths = jnp.maximum(rois[:, 2] - rois[:, 0], 1.0)
  heights = jnp.maximum(rois[:, 3] - rois[:, 1], 1.0)
  out_w, out_h = jnp.ceil(widths), jnp.ceil(heights)
  need = jnp.maximum(out_w, out_h)
  branch = jnp.minimum(jnp.sum(need[:, None] > jnp.asarray(grids, jnp.float32)[None, :-1], axis=1),
                       len(grids) - 1)
  out_w_i = jnp.minimum(out_w, max_size).astype(jnp.int32)
  out_h_i = jnp.minimum(out_h, max_size).astype(jnp.int32)

  def one(args):
    m, b, oh, ow = args
    return jax.lax.switch(b, [lambda m, oh, ow, g=g: _decode_on_grid(m, oh, ow, g) for g in grids],
                          m, oh, ow)
  if n == 0:
    return jnp.zeros((0, k, 3), jnp.float32), jnp.zeros((0, k), jnp.float32)
  ys, xs, scores = jax.lax.map(one, (maps, branch, out_h_i, out_w_i))
  x = (xs.astype(jnp.float32) + 0.5) * (widths / out_w)[:, None] + rois[:, 0:1]
  y = (ys.astype(jnp.float32) + 0.5) * (heights / out_h)[:, None] + rois[:, 1:2]
  return jnp.stack([x, y, jnp.ones_like(x)], axis=-1), scores
