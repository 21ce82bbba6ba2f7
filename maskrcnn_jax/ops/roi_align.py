"""RoIAlign in pure jax.numpy: single level, FPN multi-level, and batched forms.

Reproduces `torchvision.ops.roi_align` (its CPU kernel, `roi_align_kernel.cpp`) and
`torchvision.ops.MultiScaleRoIAlign` exactly, with static shapes so that everything jits.

Design
------
Every form runs through one core, `_pool_flat`. The feature maps are flattened into one
`[P, C]` array (for FPN: the levels concatenated, P = sum_l H_l * W_l), and each box carries the
`(offset, height, width, spatial_scale)` of the level it reads from. The single-level `roi_align`
is the special case of one level; the multi-level form does no more work than the single-level one
(each box is sampled from its own level only, not from every level and then selected).

Bilinear sampling is separable: a sample at (y, x) reads rows (y0, y0 + 1) with weights
(1 - ly, ly) and columns (x0, x0 + 1) with weights (1 - lx, lx), and the out-of-map test
(`y < -1 or y > H or x < -1 or x > W` contributes 0) splits into a row test and a column test. So per
box we compute, for each of the S_h * g sample rows, a first row and two row weights (zero when the
row is out of range, already divided by the sample count), and the same for columns. The forward
pass gathers the four neighbours of every sample from the flat array and takes the weighted sum in
float32; the backward pass (a `jax.custom_vjp`) scatter-adds the output cotangent times the same
weights into a float32 `[P, C]` buffer. Both walk over the boxes in fixed-size chunks with
`lax.scan`, so the peak memory is `O(chunk * S_h * g * S_w * g * 4 * C)` instead of the whole
`[N, S_h * g, S_w * g, 4, C]` gather (800 MB at 1000 boxes, 7x7, g = 2, C = 256).

Letters: N boxes, B batch, C channels, H/W map height/width, S crop size, g sampling ratio,
L pyramid levels, P = sum_l H_l * W_l flat positions.
"""
import functools
import math
from typing import NamedTuple, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

OutputSize = Union[int, Tuple[int, int]]

# Boxes per step of the forward gather and the backward scatter. One step's gathered neighbours
# take chunk * S_h * S_w * 4 g^2 * C * 4 bytes (0.8 MB per box at 7x7, g = 2, C = 256); small
# chunks that stay in cache measured fastest on CPU.
_CHUNK = 2


def _pair(output_size: OutputSize) -> Tuple[int, int]:
  """Returns `(S_h, S_w)` from an int or a pair of ints; raises ValueError otherwise."""
  if isinstance(output_size, int):
    size = (output_size, output_size)
  else:
    size = tuple(output_size)
  if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
    raise ValueError(f"output_size must be a positive int or a pair of them, got {output_size!r}")
  return size


def _check_sampling_ratio(sampling_ratio: int) -> None:
  """Raises ValueError unless `sampling_ratio` is a static int >= 1."""
  if not isinstance(sampling_ratio, int) or sampling_ratio < 1:
    raise ValueError(
        "sampling_ratio must be an int >= 1; torchvision's adaptive sampling (sampling_ratio <= 0, "
        "ceil(roi_size / output_size) samples per bin) depends on the box sizes, so its shapes are "
        f"not static; got {sampling_ratio!r}")


def _check_boxes(boxes: jax.Array) -> None:
  """Raises ValueError unless `boxes` is `[N, 4]`."""
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2), got shape {boxes.shape}")


class _Plan(NamedTuple):
  """Where every box samples, one axis at a time (bilinear sampling is separable).

  `rows[n, k]` is the first of the two rows that row-sample k of box n reads, `row_pos[n, k]` the
  sample's clamped y in `[0, H - 1]` and `row_in[n, k]` its weight factor: `1 / g^2`, or 0 when the
  sample lies outside `[-1, H]`; the same for columns. The bilinear weights of rows
  `(rows, rows + 1)` are `(1 - f, f)` with `f = clip(row_pos - rows, 0, 1)`. They are derived from
  these arrays at the point of use, inside the chunk loop, so that a gather position and its weight
  always come from the same stored `rows` value: XLA may otherwise recompute the sample coordinate
  in two fusions that round differently (one with a fused multiply-add), putting the weight of
  pixel k on pixel k + 1 when the coordinate is within an ulp of an integer.
  """
  offset: jax.Array  # [N] int32 flat position of pixel (0, 0) of the box's feature map.
  stride: jax.Array  # [N] int32 width W of the box's feature map: its row stride.
  rows: jax.Array  # [N, S_h * g] int32 in [0, max(H - 2, 0)].
  row_pos: jax.Array  # [N, S_h * g] float32 in [0, H - 1].
  row_in: jax.Array  # [N, S_h * g] float32, 0 or 1 / g^2.
  cols: jax.Array  # [N, S_w * g] int32 in [0, max(W - 2, 0)].
  col_pos: jax.Array  # [N, S_w * g] float32 in [0, W - 1].
  col_in: jax.Array  # [N, S_w * g] float32, 0 or 1.


def _axis_samples(start: jax.Array, length: jax.Array, extent: jax.Array, bins: int,
                  grid: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Sample positions along one axis (rows or columns) of every box, as in torchvision's kernel.

  Sample `i` of bin `p` sits at `(start + p * bin) + ((i + 0.5) * bin) / grid` with
  `bin = length / bins` (the kernel's float32 operations, in its order). A sample outside
  `[-1, extent]` contributes nothing; otherwise it is clamped to `[0, extent - 1]` (the kernel's
  `y <= 0 -> 0` and `y_low >= H - 1 -> y = H - 1`) and split between two neighbouring pixels.

  Args:
    start: [N] float32 box start in feature-map pixels (x1 or y1 times the scale, minus the offset).
    length: [N] float32 box extent in feature-map pixels (already at least 1 when not aligned).
    extent: [N] int32 size of the box's feature map along this axis (W or H), >= 1.
    bins: S, number of output bins along this axis (static).
    grid: g, samples per bin along this axis (static).

  Returns:
    first: [N, S * g] int32 first of the two pixels each sample reads, in `[0, max(extent - 2, 0)]`,
      so that `first + 1` lies in the map whenever `extent >= 2`.
    pos: [N, S * g] float32 clamped sample position in `[0, extent - 1]`.
    inside: [N, S * g] bool, whether the sample lies in `[-1, extent]`.
  """
  n = start.shape[0]
  # True divisions, as in the kernel: XLA turns a division by a broadcast constant into a
  # multiplication by its rounded reciprocal, which moves samples by an ulp or more.
  bins_, grid_ = lax.optimization_barrier(
      (jnp.full((n,), bins, jnp.float32), jnp.full((n, 1, grid), grid, jnp.float32)))
  bin_size = length / bins_
  p = jnp.arange(bins, dtype=jnp.float32)[None, :, None]
  i = jnp.arange(grid, dtype=jnp.float32)[None, None, :]
  coord = (start[:, None, None] + p * bin_size[:, None, None]) + (
      (i + 0.5) * bin_size[:, None, None]) / grid_
  coord = coord.reshape(n, bins * grid)
  size = extent.astype(jnp.float32)[:, None]
  inside = (coord >= -1.0) & (coord <= size)
  last = (extent - 1)[:, None]
  pos = jnp.clip(coord, 0.0, last.astype(jnp.float32))
  first = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, jnp.maximum(last - 1, 0))
  return first, pos, inside


def _sampling_plan(boxes: jax.Array, scale: jax.Array, height: jax.Array, width: jax.Array,
                   offset: jax.Array, size: Tuple[int, int], sampling_ratio: int,
                   aligned: bool) -> _Plan:
  """Per-axis sample positions of every box (see `_Plan`).

  Args:
    boxes: [N, 4] float32 (x1, y1, x2, y2) input pixels.
    scale: [N] float32 spatial scale of each box's feature map.
    height: [N] int32 height of each box's feature map.
    width: [N] int32 width of each box's feature map (also its row stride in the flat array).
    offset: [N] int32 flat position of pixel (0, 0) of each box's feature map.
    size: (S_h, S_w) output size (static).
    sampling_ratio: g >= 1 samples per bin along each axis (static).
    aligned: whether to shift the box by -0.5 pixel (torchvision's `aligned=True`).

  Returns:
    The `_Plan` of the N boxes.
  """
  boxes = lax.stop_gradient(boxes.astype(jnp.float32))
  shift = 0.5 if aligned else 0.0
  x1 = boxes[:, 0] * scale - shift
  y1 = boxes[:, 1] * scale - shift
  x2 = boxes[:, 2] * scale - shift
  y2 = boxes[:, 3] * scale - shift
  roi_w = x2 - x1
  roi_h = y2 - y1
  if not aligned:  # The legacy mode forces malformed boxes to be at least 1x1.
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  rows, row_pos, row_in = _axis_samples(y1, roi_h, height, size[0], sampling_ratio)
  cols, col_pos, col_in = _axis_samples(x1, roi_w, width, size[1], sampling_ratio)
  # The kernel divides each bin's sum by the sample count g^2; fold that into the row weights.
  row_in = jnp.where(row_in, 1.0 / (sampling_ratio * sampling_ratio), 0.0).astype(jnp.float32)
  return _Plan(offset, width, rows, row_pos, row_in, cols, col_pos, col_in.astype(jnp.float32))


def _pair_weights(first: jax.Array, pos: jax.Array, factor: jax.Array) -> jax.Array:
  """[b, K] first pixel, position, factor -> [b, K, 2] bilinear weights of (first, first + 1)."""
  frac = jnp.clip(pos - first.astype(jnp.float32), 0.0, 1.0)
  return jnp.stack([1.0 - frac, frac], axis=-1) * factor[..., None]


def _expand(plan: _Plan, size: Tuple[int, int], grid: int) -> Tuple[jax.Array, jax.Array]:
  """A chunk of the plan -> flat gather positions and weights of every sample's neighbours.

  Args:
    plan: `_Plan` of b boxes.
    size: (S_h, S_w) output size (static).
    grid: g samples per bin along each axis (static).

  Returns:
    starts: [b, S_h, S_w, g * g * 2] int32 flat position of the left pixel of each sample's top and
      bottom neighbour pairs, ordered (sample row i, sample column j, top/bottom). The left and right
      neighbours are adjacent in the flat array, so each start names the pair `(start, start + 1)`.
    weights: [b, S_h, S_w, g * g * 4] float32 weights in the same order followed by left/right.
  """
  s_h, s_w = size
  b = plan.rows.shape[0]
  stride = plan.stride.reshape(b, 1, 1, 1, 1, 1)
  rows = plan.rows.reshape(b, s_h, 1, grid, 1, 1)
  cols = plan.cols.reshape(b, 1, s_w, 1, grid, 1)
  step = jnp.arange(2, dtype=jnp.int32) * stride  # Top and bottom rows.
  starts = plan.offset.reshape(b, 1, 1, 1, 1, 1) + rows * stride + cols + step
  weights_y = _pair_weights(plan.rows, plan.row_pos, plan.row_in).reshape(b, s_h, 1, grid, 1, 2, 1)
  weights_x = _pair_weights(plan.cols, plan.col_pos, plan.col_in).reshape(b, 1, s_w, 1, grid, 1, 2)
  weights = weights_y * weights_x
  return (starts.reshape(b, s_h, s_w, grid * grid * 2),
          weights.reshape(b, s_h, s_w, grid * grid * 4))


def _chunked(x: jax.Array, chunks: int, chunk: int) -> jax.Array:
  """Pads the leading axis of `x` with zeros to `chunks * chunk` and splits it into chunks."""
  pad = chunks * chunk - x.shape[0]
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
  return x.reshape((chunks, chunk) + x.shape[1:])


# Gathers / scatters pairs of adjacent rows of the flat [P, C] array: one start index per pair.
_PAIR_GATHER = lax.GatherDimensionNumbers(
    offset_dims=(4, 5), collapsed_slice_dims=(), start_index_map=(0,))
_PAIR_SCATTER = lax.ScatterDimensionNumbers(
    update_window_dims=(4, 5), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,))


def _pool_forward(flat: jax.Array, plan: _Plan, size: Tuple[int, int], grid: int,
                  chunk: int) -> jax.Array:
  """Forward of `_pool_flat`: -> [N, S_h, S_w, C] float32, scanning over chunks of boxes."""
  n = plan.rows.shape[0]
  s_h, s_w = size
  positions, channels = flat.shape
  chunks = -(-n // chunk)
  k = 4 * grid * grid

  def body(_, plan_chunk):
    starts, weights = _expand(plan_chunk, size, grid)
    # In bounds by construction (see `_pool_flat`); the clamp is only a guard.
    starts = jnp.minimum(starts, positions - 2)
    values = lax.gather(flat, starts[..., None], _PAIR_GATHER, (2, channels),
                        mode="promise_in_bounds")  # [b, S_h, S_w, 2 g^2, 2, C]
    values = values.reshape(chunk * s_h * s_w, k, channels).astype(jnp.float32)
    out = jnp.einsum("pk,pkc->pc", weights.reshape(chunk * s_h * s_w, k), values,
                     precision=lax.Precision.HIGHEST)
    return None, out.reshape(chunk, s_h, s_w, channels)

  _, out = lax.scan(body, None, jax.tree.map(lambda a: _chunked(a, chunks, chunk), plan))
  return out.reshape((chunks * chunk, s_h, s_w, channels))[:n]


def _pool_backward(positions: int, plan: _Plan, cotangent: jax.Array, size: Tuple[int, int],
                   grid: int, chunk: int) -> jax.Array:
  """Backward of `_pool_flat`: scatter-adds cotangent * weights into a float32 [P, C] buffer."""
  n = plan.rows.shape[0]
  s_h, s_w = size
  channels = cotangent.shape[-1]
  chunks = -(-n // chunk)
  k = 2 * grid * grid
  xs = jax.tree.map(lambda a: _chunked(a, chunks, chunk), (plan, cotangent))

  def body(grad, x):
    plan_chunk, ct = x
    starts, weights = _expand(plan_chunk, size, grid)
    starts = jnp.minimum(starts, positions - 2)
    weights = weights.reshape(chunk, s_h, s_w, k, 2, 1)
    updates = ct.astype(jnp.float32)[:, :, :, None, None, :] * weights  # [b, S_h, S_w, k, 2, C]
    return lax.scatter_add(grad, starts[..., None], updates, _PAIR_SCATTER,
                           mode="promise_in_bounds"), None

  grad, _ = lax.scan(body, jnp.zeros((positions, channels), jnp.float32), xs)
  return grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pool_flat_vjp(flat, plan, size, grid, chunk):
  """`_pool_flat` with a scatter-add backward (see there)."""
  return _pool_forward(flat, plan, size, grid, chunk).astype(flat.dtype)


def _pool_flat_fwd(flat, plan, size, grid, chunk):
  out = _pool_flat_vjp(flat, plan, size, grid, chunk)
  # Backward needs only the shape and dtype of `flat`: keep a zero-size stand-in.
  return out, (jnp.zeros((flat.shape[0], 0), flat.dtype), plan)


def _pool_flat_bwd(size, grid, chunk, residuals, cotangent):
  like, plan = residuals
  grad = _pool_backward(like.shape[0], plan, cotangent, size, grid, chunk)
  return grad.astype(like.dtype), None  # The plan comes from the boxes: a constant.


_pool_flat_vjp.defvjp(_pool_flat_fwd, _pool_flat_bwd)


def _pool_flat(flat: jax.Array, plan: _Plan, size: Tuple[int, int], grid: int) -> jax.Array:
  """Bilinear RoI pooling from a flat feature array; differentiable w.r.t. `flat` only.

  Args:
    flat: [P, C] features (any float dtype), one or more maps flattened row-major and concatenated,
      P >= 2. Every pair `(start, start + 1)` that `_expand` names, top and bottom, must lie inside
      it (the callers pad maps of height or width 1).
    plan: `_Plan` of the N boxes (not differentiated).
    size: (S_h, S_w) output size (static).
    grid: g samples per bin along each axis (static).

  Returns:
    [N, S_h, S_w, C] pooled features in `flat`'s dtype, accumulated in float32.
  """
  n = plan.rows.shape[0]
  if n == 0:
    return jnp.zeros((0,) + tuple(size) + (flat.shape[-1],), flat.dtype)
  return _pool_flat_vjp(flat, plan, tuple(size), grid, min(_CHUNK, n))


def roi_align(features: jax.Array, boxes: jax.Array, output_size: OutputSize,
              spatial_scale: float = 1.0, sampling_ratio: int = 2,
              aligned: bool = False) -> jax.Array:
  """RoIAlign on one image's feature map, equal to `torchvision.ops.roi_align`.

  Each box is split into S_h x S_w bins; each bin averages g x g bilinear samples placed at
  `start + (p + (i + 0.5) / g) * bin_size`. As in torchvision's kernel:
  - the box is `boxes * spatial_scale`, shifted by -0.5 pixel when `aligned`;
  - when not `aligned`, box widths and heights below 1 are raised to 1 (so zero-width boxes sample a
    one-pixel box); when `aligned` they are used as given (a zero-size box samples one point);
  - a sample with `y < -1`, `y > H`, `x < -1` or `x > W` contributes 0 (it still counts in the g * g
    average); other samples are clamped into the map, and a sample at or past the last row/column
    reads that row/column only.
  Boxes partly or fully outside the map are therefore allowed.

  Only a static `sampling_ratio >= 1` is supported: torchvision's adaptive default
  (`sampling_ratio <= 0`, `ceil(box_size / output_size)` samples per bin) makes the number of
  samples depend on the box values, which static shapes cannot express.

  Differentiable w.r.t. `features` (custom VJP: a float32 scatter-add of the same weights); the boxes
  are treated as constants (their gradient is zero), as in torchvision.

  Args:
    features: [H, W, C] one image's feature map, NHWC without the batch axis; any float dtype.
    boxes: [N, 4] float32 (x1, y1, x2, y2) in input pixels (before `spatial_scale`).
    output_size: S or (S_h, S_w), the crop size.
    spatial_scale: feature-map pixels per input pixel, e.g. 0.25 for a stride-4 map.
    sampling_ratio: g >= 1 samples per bin along each axis.
    aligned: use the pixel-centre convention (subtract 0.5 after scaling), as in Detectron2.

  Returns:
    [N, S_h, S_w, C] pooled features in `features`' dtype (accumulated in float32).

  Raises:
    ValueError: for `sampling_ratio < 1`, a bad `output_size`, or inputs of the wrong rank.
  """
  if features.ndim != 3:
    raise ValueError(f"features must be [H, W, C], got shape {features.shape}")
  return multilevel_roi_align([features], boxes, output_size, [spatial_scale],
                              sampling_ratio=sampling_ratio, aligned=aligned)


def map_roi_levels(boxes: jax.Array, k_min: int, k_max: int, canonical_scale: float = 224,
                   canonical_level: int = 4, eps: float = 1e-6) -> jax.Array:
  """FPN level of each box (eq. 1 of the FPN paper), equal to torchvision's `LevelMapper`.

  `k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)` clipped to
  `[k_min, k_max]`, returned relative to `k_min`. A box of zero area goes to `k_min`. Boxes must
  satisfy `x2 >= x1` and `y2 >= y1` (a negative area has no level; it is mapped to `k_min`).

  Args:
    boxes: [N, 4] float32 (x1, y1, x2, y2) input pixels.
    k_min: level of the finest map (e.g. 2 for P2, scale 1/4).
    k_max: level of the coarsest map (e.g. 5 for P5, scale 1/32).
    canonical_scale: box size (sqrt of area) mapped to `canonical_level`.
    canonical_level: the level that canonical-size boxes come from.
    eps: added before the floor, as torchvision does.

  Returns:
    [N] int32 index into the maps, in `[0, k_max - k_min]`.
  """
  _check_boxes(boxes)
  boxes = boxes.astype(jnp.float32)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  s = jnp.sqrt(area)
  # A true division (see `_axis_samples`): 1 / 224 rounded would move boxes at level boundaries.
  scale = lax.optimization_barrier(jnp.full(s.shape, canonical_scale, jnp.float32))
  level = jnp.floor(canonical_level + jnp.log2(s / scale) + jnp.float32(eps))
  level = jnp.where(jnp.isnan(level), k_min, level)
  level = jnp.clip(level, k_min, k_max)
  return level.astype(jnp.int32) - k_min


def _level_of_scale(scale: float) -> int:
  """-log2(scale) as an int, the way torchvision's `_setup_scales` derives k_min / k_max."""
  return int(-math.log2(scale))


def multilevel_roi_align(features: Sequence[jax.Array], boxes: jax.Array,
                         output_size: OutputSize, scales: Sequence[float],
                         sampling_ratio: int = 2, aligned: bool = False,
                         canonical_scale: float = 224, canonical_level: int = 4,
                         eps: float = 1e-6) -> jax.Array:
  """FPN RoIAlign: each box pooled from one level, equal to `torchvision.ops.MultiScaleRoIAlign`.

  The level comes from `map_roi_levels` with `k_min = -log2(scales[0])` and
  `k_max = -log2(scales[-1])`, so `features` must run from the finest to the coarsest map with
  scales `2 ** -k`, k consecutive (P2..P5: 1/4, 1/8, 1/16, 1/32). With one map every box uses it
  (torchvision does the same), which is exactly `roi_align`.

  The maps are flattened into one `[sum_l H_l * W_l, C]` array and every box gathers only from its
  own level's slice of it, so the cost is that of one `roi_align` over the N boxes, not L of them.
  See `roi_align` for the sampling rules, differentiability and the `sampling_ratio` limits.

  Args:
    features: L maps `[H_l, W_l, C]` (one image, NHWC without the batch axis), finest first, all
      of the same dtype and C.
    boxes: [N, 4] float32 (x1, y1, x2, y2) input pixels.
    output_size: S or (S_h, S_w).
    scales: L spatial scales (Python floats), e.g. (1/4, 1/8, 1/16, 1/32).
    sampling_ratio: g >= 1 samples per bin along each axis.
    aligned: torchvision's `aligned` (MultiScaleRoIAlign itself always uses False).
    canonical_scale, canonical_level, eps: see `map_roi_levels`.

  Returns:
    [N, S_h, S_w, C] pooled features in the maps' dtype (accumulated in float32).

  Raises:
    ValueError: for `sampling_ratio < 1`, a bad `output_size`, mismatched maps and scales, or inputs
      of the wrong rank.
  """
  size = _pair(output_size)
  _check_sampling_ratio(sampling_ratio)
  features = list(features)
  scales = [float(s) for s in scales]
  if not features or len(features) != len(scales):
    raise ValueError(f"need one scale per feature map, got {len(features)} maps, {len(scales)} scales")
  for f in features:
    if f.ndim != 3:
      raise ValueError(f"each feature map must be [H, W, C], got shape {f.shape}")
    if f.shape[-1] != features[0].shape[-1] or f.dtype != features[0].dtype:
      raise ValueError("all feature maps must share C and dtype, got "
                       f"{[(f.shape, f.dtype) for f in features]}")
  _check_boxes(boxes)
  boxes = boxes.astype(jnp.float32)
  n = boxes.shape[0]
  channels = features[0].shape[-1]

  heights = [f.shape[0] for f in features]
  widths = [f.shape[1] for f in features]
  offsets = [0]
  for h, w in zip(heights, widths):
    offsets.append(offsets[-1] + h * w)
  flat = [f.reshape(-1, channels) for f in features]
  if min(heights + widths) == 1:
    # A sample on a map of height or width 1 also names the next row or column, with weight 0;
    # zero rows keep that read inside the array.
    flat.append(jnp.zeros((max(widths) + 1, channels), features[0].dtype))
  flat = flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=0)
  if len(features) == 1:
    level = jnp.zeros((n,), jnp.int32)
  else:
    level = map_roi_levels(boxes, _level_of_scale(scales[0]), _level_of_scale(scales[-1]),
                           canonical_scale, canonical_level, eps)

  def per_box(values, dtype):
    return jnp.asarray(values, dtype)[level]

  plan = _sampling_plan(
      boxes, per_box(scales, jnp.float32), per_box(heights, jnp.int32), per_box(widths, jnp.int32),
      per_box(offsets[:-1], jnp.int32), size, sampling_ratio, aligned)
  return _pool_flat(flat, plan, size, sampling_ratio)


def roi_align_batched(features: jax.Array, boxes: jax.Array, output_size: OutputSize,
                      spatial_scale: float = 1.0, sampling_ratio: int = 2,
                      aligned: bool = False) -> jax.Array:
  """`roi_align` over a batch: image b's boxes read only image b's map.

  Args:
    features: [B, H, W, C] feature maps (NHWC), any float dtype.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels; padding rows may hold anything (mask
      their outputs with the caller's `valid`).
    output_size, spatial_scale, sampling_ratio, aligned: as in `roi_align`.

  Returns:
    [B, N, S_h, S_w, C] pooled features in `features`' dtype.
  """
  if features.ndim != 4 or boxes.ndim != 3:
    raise ValueError(f"need features [B, H, W, C] and boxes [B, N, 4], got {features.shape}, "
                     f"{boxes.shape}")
  return jax.vmap(lambda f, b: roi_align(f, b, output_size, spatial_scale, sampling_ratio,
                                         aligned))(features, boxes)


def multilevel_roi_align_batched(features: Sequence[jax.Array], boxes: jax.Array,
                                 output_size: OutputSize, scales: Sequence[float],
                                 sampling_ratio: int = 2, aligned: bool = False,
                                 canonical_scale: float = 224, canonical_level: int = 4,
                                 eps: float = 1e-6) -> jax.Array:
  """`multilevel_roi_align` over a batch: image b's boxes read only image b's maps.

  Args:
    features: L maps `[B, H_l, W_l, C]`, finest first.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels.
    output_size, scales, sampling_ratio, aligned, canonical_scale, canonical_level, eps: as in
      `multilevel_roi_align`.

  Returns:
    [B, N, S_h, S_w, C] pooled features in the maps' dtype.
  """
  features = list(features)
  if any(f.ndim != 4 for f in features) or boxes.ndim != 3:
    raise ValueError("need feature maps [B, H_l, W_l, C] and boxes [B, N, 4], got "
                     f"{[f.shape for f in features]}, {boxes.shape}")
  return jax.vmap(lambda f, b: multilevel_roi_align(
      f, b, output_size, scales, sampling_ratio, aligned, canonical_scale, canonical_level,
      eps))(features, boxes)
