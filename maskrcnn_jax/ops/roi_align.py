"""RoIAlign in pure jax.numpy: single level, FPN multi-level, and batched forms.

Reproduces `torchvision.ops.roi_align` (its CPU kernel, `roi_align_kernel.cpp`) and
`torchvision.ops.MultiScaleRoIAlign` exactly, with static shapes so that everything jits.

Design
------
Every form runs through one core, `_pool_levels` -> `_pool_flat`. The feature maps are flattened
into one `[P, C]` array (the levels, and the images of a batch, concatenated: P = B sum_l H_l W_l)
and each box carries the offset, height, width and spatial scale of the map it reads from, so the
single-level `roi_align` is the special case of one level and one image, and the multi-level form
does the work of one `roi_align` over all boxes (each box samples its own level only, not every
level followed by a selection).

Bilinear sampling is separable: a sample at (y, x) reads rows (y0, y0 + 1) with weights
(1 - ly, ly) and columns (x0, x0 + 1) with weights (1 - lx, lx), and the kernel's out-of-map test
(`y < -1 or y > H or x < -1 or x > W` contributes 0) splits into a row test and a column test. So
the boxes are first reduced to a small per-axis plan (`_Plan`: S_h * g sample rows and S_w * g
sample columns per box). The pixels (x0, y0) and (x0 + 1, y0) are adjacent in the flat array, so
each sample needs two gathered pairs of C-vectors (top and bottom), with x0 <= W - 2 and
y0 <= H - 2 arranged by moving a sample on the last row/column onto the pair ending there.

The forward pass walks over the boxes in chunks (`lax.scan`): per chunk it expands the plan into
flat pair positions and the products of row and column weights, gathers
`[chunk, S_h, S_w, 2 g^2, 2, C]` and contracts it with the weights in float32. The backward pass
(a `jax.custom_vjp`) walks the same chunks and scatter-adds cotangent x weights into a float32
`[P, C]` buffer. Peak memory is therefore `O(chunk * S_h * S_w * 4 g^2 * C)` on top of the
output and the gradient, instead of the whole `[N, S_h g, S_w g, 4, C]` gather (800 MB at 1000
boxes, 7x7, g = 2, C = 256). On CPU (2 cores, 1000 boxes, 7x7, C = 256, a 200 x 304 map)
`benchmarks/bench_roi_align.py` measures about 0.3x torchvision's forward time and 0.15-0.2x its
forward + backward time.

Numerics: the sample positions use the kernel's float32 operations in its order, with true
divisions (XLA would otherwise multiply by a rounded reciprocal) and products rounded before the
additions they feed (XLA's CPU backend would otherwise fuse them into FMAs; see `_rounded`), so
positions match torchvision bit for bit and outputs differ only by float32 round-off in the sums
(< 1e-6 on random maps of up to 160 pixels in tests run while writing this).

Letters: N boxes, B batch, C channels, H/W map height/width, S crop size, g sampling ratio,
L pyramid levels, P flat positions.
"""
import functools
import math
from typing import NamedTuple, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.types import Array

OutputSize = Union[int, Tuple[int, int]]

# Boxes per step of the forward gather and the backward scatter, by backend. One step's gathered
# neighbours take chunk * S_h * S_w * 4 g^2 * C * 4 bytes (0.8 MB per box at 7x7, g = 2, C = 256).
# On CPU, chunks that stay in cache measured fastest (1-2 boxes: 2x faster than 32); accelerators
# want wide steps instead (a guess, not yet measured: 256).
_CHUNK = {"cpu": 2}
_CHUNK_ACCELERATOR = 256


def _chunk_size(n: int) -> int:
  """Boxes per scan step for N boxes on the default backend."""
  return max(1, min(n, _CHUNK.get(jax.default_backend(), _CHUNK_ACCELERATOR)))


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


def _check_boxes(boxes: Array) -> None:
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
  offset: Array  # [N] int32 flat position of pixel (0, 0) of the box's feature map.
  stride: Array  # [N] int32 width W of the box's feature map: its row stride.
  rows: Array  # [N, S_h * g] int32 in [0, max(H - 2, 0)].
  row_pos: Array  # [N, S_h * g] float32 in [0, H - 1].
  row_in: Array  # [N, S_h * g] float32, 0 or 1 / g^2.
  cols: Array  # [N, S_w * g] int32 in [0, max(W - 2, 0)].
  col_pos: Array  # [N, S_w * g] float32 in [0, W - 1].
  col_in: Array  # [N, S_w * g] float32, 0 or 1.


def _rounded(x: Array) -> Array:
  """Returns `x` bit for bit, opaque to the compiler, so that a product is rounded before an add.

  As in the C++ kernel, a product passed through here is rounded to float32 before the addition
  it feeds instead of being fused into a multiply-add: XLA's CPU backend contracts `a * b + c` into
  an FMA on machines that have one, which moves sample positions by an ulp and so changed results
  by up to ~6e-5 on 100-pixel maps.

  The low mantissa bit is or-ed with `isnan(x)`, which is 0 unless `x` is NaN (and a NaN stays a
  NaN), so the value never changes but neither XLA nor LLVM can see that.
  """
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  return lax.bitcast_convert_type(bits | jnp.isnan(x).astype(jnp.uint32), jnp.float32)


def _axis_samples(start: Array, length: Array, extent: Array, bins: int,
                  grid: int) -> Tuple[Array, Array, Array]:
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
  coord = (start[:, None, None] + _rounded(p * bin_size[:, None, None])) + (
      (i + 0.5) * bin_size[:, None, None]) / grid_
  coord = coord.reshape(n, bins * grid)
  size = extent.astype(jnp.float32)[:, None]
  inside = (coord >= -1.0) & (coord <= size)
  last = (extent - 1)[:, None]
  pos = jnp.clip(coord, 0.0, last.astype(jnp.float32))
  first = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, jnp.maximum(last - 1, 0))
  return first, pos, inside


def _sampling_plan(boxes: Array, scale: Array, height: Array, width: Array,
                   offset: Array, size: Tuple[int, int], sampling_ratio: int,
                   aligned: bool, stride: Array = None) -> _Plan:
  """Per-axis sample positions of every box (see `_Plan`).

  Args:
    boxes: [N, 4] float32 (x1, y1, x2, y2) input pixels.
    scale: [N] float32 spatial scale of each box's feature map.
    height: [N] int32 height of each box's feature map.
    width: [N] int32 width of each box's feature map (also its row stride in the flat array unless
      `stride` is given).
    offset: [N] int32 flat position of pixel (0, 0) of each box's feature map.
    size: (S_h, S_w) output size (static).
    sampling_ratio: g >= 1 samples per bin along each axis (static).
    aligned: whether to shift the box by -0.5 pixel (torchvision's `aligned=True`).
    stride: [N] int32 row stride in the flat array when the map's valid `width` is smaller than
      its stored width (bucketed canvases), else None.

  Returns:
    The `_Plan` of the N boxes.
  """
  boxes = lax.stop_gradient(boxes.astype(jnp.float32))
  shift = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = jnp.moveaxis(_rounded(boxes * scale[:, None]) - shift, -1, 0)
  roi_w = x2 - x1
  roi_h = y2 - y1
  if not aligned:  # The legacy mode forces malformed boxes to be at least 1x1.
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  rows, row_pos, row_in = _axis_samples(y1, roi_h, height, size[0], sampling_ratio)
  cols, col_pos, col_in = _axis_samples(x1, roi_w, width, size[1], sampling_ratio)
  # The kernel divides each bin's sum by the sample count g^2; fold that into the row weights.
  row_in = jnp.where(row_in, 1.0 / (sampling_ratio * sampling_ratio), 0.0).astype(jnp.float32)
  return _Plan(offset, width if stride is None else stride, rows, row_pos, row_in, cols, col_pos,
               col_in.astype(jnp.float32))


def _pair_weights(first: Array, pos: Array, factor: Array) -> Array:
  """[b, K] first pixel, position, factor -> [b, K, 2] bilinear weights of (first, first + 1)."""
  frac = jnp.clip(pos - first.astype(jnp.float32), 0.0, 1.0)
  return jnp.stack([1.0 - frac, frac], axis=-1) * factor[..., None]


def _expand(plan: _Plan, size: Tuple[int, int], grid: int) -> Tuple[Array, Array]:
  """A chunk of the plan -> flat gather positions and weights of every sample's neighbours.

  Args:
    plan: `_Plan` of b boxes.
    size: (S_h, S_w) output size (static).
    grid: g samples per bin along each axis (static).

  Returns:
    starts: [b, S_h, S_w, g * g * 2] int32 flat position of the left pixel of each sample's top and
      bottom neighbour pairs, ordered (sample row i, sample column j, top/bottom). The left and
      right neighbours are adjacent in the flat array: each start names the pair
      `(start, start + 1)`.
    weights: [b, S_h, S_w, g * g * 4] float32 weights in the same order followed by left/right.
  """
  s_h, s_w = size
  b = plan.rows.shape[0]
  stride = plan.stride.reshape(b, 1, 1, 1, 1, 1)
  rows = plan.rows.reshape(b, s_h, 1, grid, 1, 1)
  cols = plan.cols.reshape(b, 1, s_w, 1, grid, 1)
  step = jnp.arange(2, dtype=jnp.int32) * stride  # Top and bottom rows.
  starts = plan.offset.reshape(b, 1, 1, 1, 1, 1) + rows * stride + cols + step
  weights_y = _pair_weights(plan.rows, plan.row_pos, plan.row_in)
  weights_x = _pair_weights(plan.cols, plan.col_pos, plan.col_in)
  weights_y = weights_y.reshape(b, s_h, 1, grid, 1, 2, 1)
  weights_x = weights_x.reshape(b, 1, s_w, 1, grid, 1, 2)
  weights = weights_y * weights_x
  return (starts.reshape(b, s_h, s_w, grid * grid * 2),
          weights.reshape(b, s_h, s_w, grid * grid * 4))


def _chunked(x: Array, chunks: int, chunk: int) -> Array:
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


def _pool_forward(flat: Array, plan: _Plan, size: Tuple[int, int], grid: int,
                  chunk: int) -> Array:
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


def _pool_backward(positions: int, plan: _Plan, cotangent: Array, size: Tuple[int, int],
                   grid: int, chunk: int) -> Array:
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


def _pool_flat(flat: Array, plan: _Plan, size: Tuple[int, int], grid: int) -> Array:
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
  return _pool_flat_vjp(flat, plan, tuple(size), grid, _chunk_size(n))


def _pool_levels(features: Sequence[Array], boxes: Array, size: Tuple[int, int],
                 scales: Sequence[float], sampling_ratio: int, aligned: bool,
                 canonical_scale: float, canonical_level: int, eps: float,
                 extents: Array = None) -> Array:
  """The one implementation behind all four public forms (their arguments already checked).

  The batch is handled like the levels: all `B * L` maps go into one flat array and every box
  carries the offset of its own image's map at its own level, so a batch costs no more than the
  same number of boxes of one image (a `vmap` would batch the gathers and scatters instead).

  Args:
    features: L maps `[B, H_l, W_l, C]`, finest first, one dtype.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels.
    size: (S_h, S_w).
    scales, sampling_ratio, aligned, canonical_scale, canonical_level, eps: as in
      `multilevel_roi_align`.
    extents: [B, L, 2] int32 valid (height, width) of each image's map per level, or None (the
      whole stored map is valid).

  Returns:
    [B, N, S_h, S_w, C] in the maps' dtype.
  """
  batch, n = boxes.shape[:2]
  channels = features[0].shape[-1]
  heights = [f.shape[1] for f in features]
  widths = [f.shape[2] for f in features]
  offsets = [0]
  for h, w in zip(heights, widths):
    offsets.append(offsets[-1] + batch * h * w)
  flat = [f.reshape(-1, channels) for f in features]
  if min(heights + widths) == 1:
    # A sample on a map of height or width 1 also names the next row or column, with weight 0;
    # zero rows keep that read inside the array.
    flat.append(jnp.zeros((max(widths) + 1, channels), features[0].dtype))
  flat = flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=0)

  boxes = boxes.reshape(batch * n, 4)
  if len(features) == 1:
    level = jnp.zeros((batch * n,), jnp.int32)
  else:
    k_min, k_max = _level_of_scale(scales[0]), _level_of_scale(scales[-1])
    level = map_roi_levels(boxes, k_min, k_max, canonical_scale, canonical_level, eps)
  image = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), n)

  def per_box(values, dtype):
    return jnp.asarray(values, dtype)[level]

  height, width = per_box(heights, jnp.int32), per_box(widths, jnp.int32)
  offset = per_box(offsets[:-1], jnp.int32) + image * height * width
  stride = None
  if extents is not None:  # bounds from the valid extent, addressing from the stored map
    stride = width
    ext = jnp.asarray(extents, jnp.int32)[image, level]
    height = jnp.minimum(ext[:, 0], height)
    width = jnp.minimum(ext[:, 1], width)
  plan = _sampling_plan(boxes, per_box(scales, jnp.float32), height, width, offset, size,
                        sampling_ratio, aligned, stride)
  out = _pool_flat(flat, plan, size, sampling_ratio)
  return out.reshape((batch, n) + out.shape[1:])


def _check_levels(features: Sequence[Array], scales: Sequence[float], rank: int) -> None:
  """Raises ValueError unless the maps have `rank` dims, one C and dtype, one scale per map, and
  (for several maps) scales `2 ** -k` of consecutive levels k."""
  if not features or len(features) != len(scales):
    raise ValueError(
        f"need one scale per feature map, got {len(features)} maps and {len(scales)} scales")
  for f in features:
    if f.ndim != rank:
      raise ValueError(f"each feature map must have {rank} dims "
                       f"({'[B, H, W, C]' if rank == 4 else '[H, W, C]'}), got shape {f.shape}")
    if (f.shape[-1], f.dtype) != (features[0].shape[-1], features[0].dtype):
      raise ValueError("all feature maps must share C and dtype, got "
                       f"{[(f.shape, f.dtype) for f in features]}")
    if rank == 4 and f.shape[0] != features[0].shape[0]:
      raise ValueError(f"all feature maps must share B, got {[f.shape for f in features]}")
  if len(features) > 1:
    k_min, k_max = _level_of_scale(scales[0]), _level_of_scale(scales[-1])
    if k_max - k_min + 1 != len(features):
      raise ValueError(f"scales {list(scales)} do not name {len(features)} consecutive pyramid "
                       f"levels (k_min = {k_min}, k_max = {k_max})")


def roi_align(features: Array, boxes: Array, output_size: OutputSize,
              spatial_scale: float = 1.0, sampling_ratio: int = 2,
              aligned: bool = False) -> Array:
  """RoIAlign on one image's feature map, equal to `torchvision.ops.roi_align`.

  Each box is split into S_h x S_w bins; each bin averages g x g bilinear samples placed at
  `start + (p + (i + 0.5) / g) * bin_size`. As in torchvision's kernel:
  - the box is `boxes * spatial_scale`, shifted by -0.5 pixel when `aligned`;
  - when not `aligned`, box widths and heights below 1 are raised to 1 (so zero-width boxes sample a
    one-pixel box); when `aligned` they are used as given (a zero-size box samples one point);
  - a sample with `y < -1`, `y > H`, `x < -1` or `x > W` contributes 0 (it still counts in the g * g
    average); other samples are clamped into the map, and a sample at or past the last row/column
    reads that row/column only.
  Boxes partly or fully outside the map are therefore allowed. The float32 arithmetic follows the
  kernel's operation by operation (no fused multiply-adds, true divisions), so results agree to
  float32 round-off in the final sums.

  Only a static `sampling_ratio >= 1` is supported: torchvision's adaptive default
  (`sampling_ratio <= 0`, `ceil(box_size / output_size)` samples per bin) makes the number of
  samples depend on the box values, which static shapes cannot express.

  Differentiable w.r.t. `features` (custom VJP: a float32 scatter-add of the same weights); the
  boxes are treated as constants (their gradient is zero), as in torchvision.

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


def map_roi_levels(boxes: Array, k_min: int, k_max: int, canonical_scale: float = 224,
                   canonical_level: int = 4, eps: float = 1e-6) -> Array:
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


def multilevel_roi_align(features: Sequence[Array], boxes: Array,
                         output_size: OutputSize, scales: Sequence[float],
                         sampling_ratio: int = 2, aligned: bool = False,
                         canonical_scale: float = 224, canonical_level: int = 4,
                         eps: float = 1e-6) -> Array:
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
    ValueError: for `sampling_ratio < 1`, a bad `output_size`, maps and scales that do not match
      (one scale per map, consecutive levels), or inputs of the wrong rank.
  """
  size = _pair(output_size)
  _check_sampling_ratio(sampling_ratio)
  features, scales = list(features), [float(s) for s in scales]
  _check_levels(features, scales, rank=3)
  _check_boxes(boxes)
  out = _pool_levels([f[None] for f in features], boxes.astype(jnp.float32)[None], size, scales,
                     sampling_ratio, aligned, canonical_scale, canonical_level, eps)
  return out[0]


def roi_align_batched(features: Array, boxes: Array, output_size: OutputSize,
                      spatial_scale: float = 1.0, sampling_ratio: int = 2,
                      aligned: bool = False) -> Array:
  """`roi_align` over a batch: image b's boxes read only image b's map.

  Equal to `jax.vmap(roi_align)` over the leading axis, but implemented by flattening the batch
  into the core's flat array (see `_pool_levels`), which is ~2x faster than the vmap on CPU.

  Args:
    features: [B, H, W, C] feature maps (NHWC), any float dtype.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels; padding rows may hold anything finite
      (mask their outputs with the caller's `valid`).
    output_size, spatial_scale, sampling_ratio, aligned: as in `roi_align`.

  Returns:
    [B, N, S_h, S_w, C] pooled features in `features`' dtype.

  Raises:
    ValueError: as `roi_align`, or if the batch sizes differ.
  """
  if features.ndim != 4:
    raise ValueError(f"features must be [B, H, W, C], got shape {features.shape}")
  return multilevel_roi_align_batched([features], boxes, output_size, [spatial_scale],
                                      sampling_ratio=sampling_ratio, aligned=aligned)


def multilevel_roi_align_batched(features: Sequence[Array], boxes: Array,
                                 output_size: OutputSize, scales: Sequence[float],
                                 sampling_ratio: int = 2, aligned: bool = False,
                                 canonical_scale: float = 224, canonical_level: int = 4,
                                 eps: float = 1e-6, extents: Array = None) -> Array:
  """`multilevel_roi_align` over a batch: image b's boxes read only image b's maps.

  Equal to `jax.vmap(multilevel_roi_align)` over the leading axis (see `roi_align_batched`).

  Args:
    features: L maps `[B, H_l, W_l, C]`, finest first.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels.
    output_size, scales, sampling_ratio, aligned, canonical_scale, canonical_level, eps: as in
      `multilevel_roi_align`.
    extents: optional [B, L, 2] int32 (h, w) <= (H_l, W_l): each image's maps are treated as if
      only their top-left `h x w` existed (the kernel's border rules apply there), which is what
      an image padded less than the batch canvas saw in torchvision. None: the whole maps.

  Returns:
    [B, N, S_h, S_w, C] pooled features in the maps' dtype.

  Raises:
    ValueError: as `multilevel_roi_align`, or if the batch sizes differ.
  """
  size = _pair(output_size)
  _check_sampling_ratio(sampling_ratio)
  features, scales = list(features), [float(s) for s in scales]
  _check_levels(features, scales, rank=4)
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features[0].shape[0]:
    raise ValueError(f"boxes must be [B, N, 4] with the maps' B = {features[0].shape[0]}, got "
                     f"shape {boxes.shape}")
  if extents is not None and jnp.shape(extents) != (boxes.shape[0], len(features), 2):
    raise ValueError(f"extents must be [B, L, 2] = [{boxes.shape[0]}, {len(features)}, 2], got "
                     f"shape {jnp.shape(extents)}")
  return _pool_levels(features, boxes.astype(jnp.float32), size, scales, sampling_ratio, aligned,
                      canonical_scale, canonical_level, eps, extents)
