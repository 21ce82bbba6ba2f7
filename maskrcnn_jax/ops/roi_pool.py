"""RoIPool in pure jax.numpy, equal to `torchvision.ops.roi_pool` (its CPU kernel), with static
shapes: single level, and FPN multi-level over a batch.

RoIPool snaps each box to the feature grid, splits it into S_h x S_w bins of whole pixels and takes
the maximum of every bin. A bin covers a data-dependent number of pixels, so each bin here reads a
static window of K_h rows and K_w columns (`_windows`): exactly its pixels when it has at most that
many, evenly spaced ones of them otherwise. The maps and boxes are laid out as in RoIAlign's core
(`roi_align._flatten_maps`: one flat `[P, C]` array of every map of the batch and pyramid, a map
offset per box); the forward pass walks over chunks of boxes (`lax.scan`), gathers
`[chunk, S_h, K_h, S_w, K_w, C]` and reduces it separably, first over each window row's columns and
then over the rows, keeping the position of the first maximum. The backward pass (a
`jax.custom_vjp`) scatter-adds the cotangent at those positions, which is torchvision's rule (its
argmax is the first maximum in row-major order: a strict `>` scanning rows, then columns).

Letters: N boxes, B batch, C channels, H/W map height/width, S crop size, K bin window,
L pyramid levels, P flat positions.
"""
import functools
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.ops.roi_align import (
    OutputSize,
    _by_platform_chunks,
    _check_batched,
    _check_boxes,
    _chunked,
    _divisor,
    _flatten_maps,
    _pair,
    _quantize_boxes,
)
from maskrcnn_jax.types import Array


def _bin_edges(start: Array, size: Array, extent: Array, bins: int) -> Tuple[Array, Array]:
  """Each bin's first and end pixel along one axis, as torchvision's kernel computes them.

  `bin = size / S` (float32), `lo = floor(p * bin) + start`, `hi = ceil((p + 1) * bin) + start`,
  both clipped to `[0, extent]`; the bin covers pixels `lo .. hi - 1` (none when `hi <= lo`).

  Args:
    start: [N] int32 first pixel of the quantized box.
    size: [N] int32 pixels the quantized box covers, >= 1.
    extent: [N] int32 the map's size along this axis.
    bins: S (static).

  Returns:
    lo, hi: [N, S] int32 in `[0, extent]`.
  """
  size = size.astype(jnp.float32)[:, None]
  bin_size = size / _divisor(size, bins)  # A true division, not a product with a rounded 1 / S.
  p = jnp.arange(bins, dtype=jnp.float32)[None]
  lo = jnp.floor(p * bin_size).astype(jnp.int32) + start[:, None]
  hi = jnp.ceil((p + 1.0) * bin_size).astype(jnp.int32) + start[:, None]
  return jnp.clip(lo, 0, extent[:, None]), jnp.clip(hi, 0, extent[:, None])


def _windows(lo: Array, hi: Array, extent: Array, window: int) -> Tuple[Array, Array]:
  """The K pixels each bin reads along one axis: all of `lo .. hi - 1` when there are at most K,
  else `lo + floor(k * (hi - lo) / K)` for k < K (evenly spaced, first and order kept).

  Args:
    lo, hi: [N, S] int32 bin edges from `_bin_edges`.
    extent: [N] int32 the map's size along this axis.
    window: K (static).

  Returns:
    index: [N, S, K] int32 pixel in `[0, extent - 1]`.
    valid: [N, S, K] bool, whether the pixel belongs to the bin (the rest are padding).
  """
  length = (hi - lo)[..., None]
  k = jnp.arange(window, dtype=jnp.int32)
  offset = jnp.where(length > window, (k * length) // window, k)
  valid = k < length
  index = jnp.clip(lo[..., None] + offset, 0, jnp.maximum(extent - 1, 0)[:, None, None])
  return index, valid


def _pool_forward(flat: Array, rows: Array, row_ok: Array, cols: Array, col_ok: Array,
                  offset: Array, stride: Array, chunk: int) -> Tuple[Array, Array, Array]:
  """RoIPool's maxima and their positions, scanning over chunks of boxes.

  Args:
    flat: [P, C] the flat maps (see `roi_align._flatten_maps`).
    rows, row_ok: [N, S_h, K_h] int32 / bool from `_windows`; cols, col_ok: [N, S_w, K_w].
    offset, stride: [N] int32 flat position of pixel (0, 0) of each box's map, and its row stride.
    chunk: boxes per scan step.

  Returns:
    out: [N, S_h, S_w, C] in `flat`'s dtype: the maximum of each bin, 0 for an empty bin.
    where: [N, S_h, S_w, C] int32 flat position of the first maximum (0 for an empty bin).
    filled: [N, S_h, S_w] bool, whether the bin has pixels.
  """
  n, s_h, k_h = rows.shape
  _, s_w, k_w = cols.shape
  channels = flat.shape[-1]
  chunks = -(-n // chunk)

  def body(_, x):
    rows, row_ok, cols, col_ok, offset, stride = x
    b = rows.shape[0]
    base = offset[:, None, None] + rows * stride[:, None, None]  # [b, S_h, K_h]
    pos = base[:, :, :, None, None] + cols[:, None, None]  # [b, S_h, K_h, S_w, K_w]
    ok = row_ok[:, :, :, None, None] & col_ok[:, None, None]
    values = flat.at[pos].get(mode="promise_in_bounds")  # [b, S_h, K_h, S_w, K_w, C]
    values = jnp.where(ok[..., None], values, -jnp.inf)
    # Separable: over each window row's columns, then over the rows; argmax takes the first
    # maximum, so the winner is the first in row-major order, as in the kernel.
    col_best = jnp.argmax(values, axis=4)  # [b, S_h, K_h, S_w, C]
    col_max = jnp.max(values, axis=4)
    row_best = jnp.argmax(col_max, axis=2)  # [b, S_h, S_w, C]
    out = jnp.max(col_max, axis=2)
    col_best = jnp.take_along_axis(col_best, row_best[:, :, None], axis=2)[:, :, 0]
    # Flat position of the winner: its row's base plus its column.
    win_base = jnp.take_along_axis(base[:, :, :, None, None], row_best[:, :, None], axis=2)
    win_col = jnp.take_along_axis(cols[:, None, :, :, None], col_best[:, :, :, None], axis=3)
    where = win_base[:, :, 0] + win_col[:, :, :, 0]
    filled = jnp.any(row_ok, axis=2)[:, :, None] & jnp.any(col_ok, axis=2)[:, None, :]
    out = jnp.where(filled[..., None], out, jnp.zeros((), out.dtype))
    where = jnp.where(filled[..., None], where, 0)
    return None, (out.reshape(b, s_h, s_w, channels), where, filled)

  xs = jax.tree.map(lambda a: _chunked(a, chunks, chunk),
                    (rows, row_ok, cols, col_ok, offset, stride))
  _, outs = lax.scan(body, None, xs)
  return tuple(a.reshape((chunks * chunk,) + a.shape[2:])[:n] for a in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _pool_flat(flat, rows, row_ok, cols, col_ok, offset, stride, chunk):
  """`_pool_forward`'s maxima; the gradient w.r.t. `flat` goes to the first maxima."""
  return _pool_forward(flat, rows, row_ok, cols, col_ok, offset, stride, chunk)[0]


def _pool_flat_fwd(flat, rows, row_ok, cols, col_ok, offset, stride, chunk):
  out, where, filled = _pool_forward(flat, rows, row_ok, cols, col_ok, offset, stride, chunk)
  return out, (jnp.zeros((flat.shape[0], 0), flat.dtype), where, filled)


def _pool_flat_bwd(chunk, residuals, cotangent):
  like, where, filled = residuals
  channels = cotangent.shape[-1]
  cotangent = jnp.where(filled[..., None], cotangent.astype(jnp.float32), 0.0)
  channel = jnp.broadcast_to(jnp.arange(channels, dtype=jnp.int32), where.shape)
  positions = like.shape[0]
  if positions * channels < 2 ** 31:  # One flat index per element scatters ~25% faster on CPU.
    grad = jnp.zeros((positions * channels,), jnp.float32).at[where * channels + channel].add(
        cotangent, mode="promise_in_bounds").reshape(positions, channels)
  else:
    grad = jnp.zeros((positions, channels), jnp.float32).at[where, channel].add(
        cotangent, mode="promise_in_bounds")
  return (grad.astype(like.dtype),) + (None,) * 6  # The windows come from the boxes: constants.


_pool_flat.defvjp(_pool_flat_fwd, _pool_flat_bwd)


def _window_size(extent: int, bins: int, max_bin_size: Optional[int]) -> int:
  """K along one axis for maps of at most `extent` pixels (see `multilevel_roi_pool_batched`)."""
  if max_bin_size is None:
    # A box inside the map covers at most extent + 1 pixels after rounding; a bin of
    # b = size / S pixels touches at most ceil(b) + 1 of them.
    max_bin_size = math.ceil((extent + 1) / bins) + 1
  return max(1, min(max_bin_size, extent))


def _pool_levels(features: Sequence[Array], boxes: Array, size: Tuple[int, int],
                 scales: Sequence[float], canonical_scale: float, canonical_level: int,
                 eps: float, extents: Optional[Array], max_bin_size: Optional[int]) -> Array:
  """The implementation behind both public forms (arguments already checked): -> [B, N, S_h,
  S_w, C]."""
  batch, n = boxes.shape[:2]
  channels = features[0].shape[-1]
  flat, boxes, maps, _ = _flatten_maps(features, boxes, scales, canonical_scale,
                                       canonical_level, eps, extents, pad=False)
  if batch * n == 0:
    return jnp.zeros((batch, n) + size + (channels,), flat.dtype)
  k_h = _window_size(max(f.shape[1] for f in features), size[0], max_bin_size)
  k_w = _window_size(max(f.shape[2] for f in features), size[1], max_bin_size)
  start, length = _quantize_boxes(lax.stop_gradient(boxes), maps.scale)
  rows, row_ok = _windows(*_bin_edges(start[:, 1], length[:, 1], maps.height, size[0]),
                          maps.height, k_h)
  cols, col_ok = _windows(*_bin_edges(start[:, 0], length[:, 0], maps.width, size[1]),
                          maps.width, k_w)
  stride = maps.width if maps.stride is None else maps.stride
  out = _by_platform_chunks(
      lambda chunk, *a: _pool_flat(*a, chunk), batch * n,
      size[0] * size[1] * k_h * k_w * channels * 4, flat, rows, row_ok, cols, col_ok,
      maps.offset, stride)
  return out.reshape((batch, n) + out.shape[1:])


def _check_max_bin_size(max_bin_size: Optional[int]) -> None:
  if max_bin_size is not None and (isinstance(max_bin_size, bool) or not isinstance(
      max_bin_size, int) or max_bin_size < 1):
    raise ValueError(f"max_bin_size must be None or an int >= 1, got {max_bin_size!r}")


def roi_pool(features: Array, boxes: Array, output_size: OutputSize,
             spatial_scale: float = 1.0, *, max_bin_size: Optional[int] = None) -> Array:
  """RoIPool on one image's feature map, equal to `torchvision.ops.roi_pool`.

  As in torchvision's kernel: the box is snapped to the grid, `x0 = round(x1 * spatial_scale)`,
  `x_end = round(x2 * spatial_scale)` (C++ `std::round`: halves away from zero),
  `w = max(x_end - x0 + 1, 1)` (the same for y); bin `(p_h, p_w)` covers rows
  `floor(p_h * h / S_h) + y0 .. ceil((p_h + 1) * h / S_h) + y0 - 1` and the same for columns
  (float32 `h / S_h`), clipped to the map; its output is the maximum over those pixels, 0 when the
  clipped bin is empty. The gradient w.r.t. `features` goes to the first maximum in row-major
  order (torchvision's argmax), per channel; the boxes are constants.

  Static shapes: each bin reads a window of at most `K_h` rows and `K_w` columns,
  `K = min(max_bin_size, map size)` per axis. Results are exact (equal to torchvision) for every
  bin that, clipped to the map, has at most K rows and K columns; a bin with more is reduced over
  K evenly spaced of its rows (or columns), `lo + floor(k * rows / K)`, so it differs from
  torchvision. The default `max_bin_size=None` takes `K = ceil((H + 1) / S_h) + 1` (and the same
  for W), exact for every box inside the map; `max_bin_size >= max(H, W)` is exact for every box.
  The work per box grows with `S_h * S_w * K_h * K_w`, so on large maps pass the largest bin the
  boxes need. Features are assumed finite (a bin of -inf values gives -inf, torchvision's
  -FLT_MAX).

  Args:
    features: [H, W, C] one image's feature map, NHWC without the batch axis; any float dtype.
    boxes: [N, 4] float32 (x1, y1, x2, y2) in input pixels (before `spatial_scale`).
    output_size: S or (S_h, S_w).
    spatial_scale: feature-map pixels per input pixel, e.g. 0.25 for a stride-4 map.
    max_bin_size: K, the most pixels a bin reads along each axis (static), or None (see above).

  Returns:
    [N, S_h, S_w, C] in `features`' dtype.

  Raises:
    ValueError: for a bad `output_size` or `max_bin_size`, or inputs of the wrong rank.
  """
  if features.ndim != 3:
    raise ValueError(f"features must be [H, W, C], got shape {features.shape}")
  _check_boxes(boxes)
  return multilevel_roi_pool_batched([features[None]], boxes[None], output_size, [spatial_scale],
                                     max_bin_size=max_bin_size)[0]


def multilevel_roi_pool_batched(features: Sequence[Array], boxes: Array,
                                output_size: OutputSize, scales: Sequence[float],
                                canonical_scale: float = 224, canonical_level: int = 4,
                                eps: float = 1e-6, extents: Array = None, *,
                                max_bin_size: Optional[int] = None) -> Array:
  """`roi_pool` with FPN levels over a batch: image b's boxes read only image b's maps, each box
  the level `map_roi_levels` gives it (as `multilevel_roi_align_batched` does for RoIAlign).

  Args:
    features: L maps `[B, H_l, W_l, C]`, finest first, scales `2 ** -k` of consecutive levels k.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels.
    output_size: S or (S_h, S_w).
    scales: L spatial scales (Python floats), e.g. (1/4, 1/8, 1/16, 1/32).
    canonical_scale, canonical_level, eps: see `map_roi_levels`.
    extents: optional [B, L, 2] int32 (h, w) <= (H_l, W_l): the valid top-left part of each
      image's maps; bins are clipped to it. None: the whole maps.
    max_bin_size: K (static), as in `roi_pool`; the default takes the largest map's size.

  Returns:
    [B, N, S_h, S_w, C] in the maps' dtype.

  Raises:
    ValueError: as `multilevel_roi_align_batched`, or for a bad `max_bin_size`.
  """
  size = _pair(output_size)
  _check_max_bin_size(max_bin_size)
  # numpy inputs are taken too (jnp arrays inside the scan below).
  features, scales = [jnp.asarray(f) for f in features], [float(s) for s in scales]
  boxes = jnp.asarray(boxes)
  _check_batched(features, scales, boxes, extents)
  return _pool_levels(features, boxes.astype(jnp.float32), size, scales, canonical_scale,
                      canonical_level, eps, extents, max_bin_size)
