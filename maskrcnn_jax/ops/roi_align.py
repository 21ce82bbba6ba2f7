"""RoIAlign in pure jax.numpy: single level, FPN multi-level, and batched forms.

Reproduces `torchvision.ops.roi_align` (its CPU kernel, `roi_align_kernel.cpp`) and
`torchvision.ops.MultiScaleRoIAlign` exactly, with static shapes so that everything jits. The same
core serves the other sampled RoI layers of the Mask R-CNN paper's Table 2c: adaptive sampling
(`sampling_ratio=0`, torchvision's default, with a static cap), "RoIAlign max" (`reduce="max"`)
and RoIWarp (`roi_warp`: RoIPool's snapped box, sampled bilinearly). RoIPool is in `roi_pool.py`.

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

On TPU and GPU the same plan runs as matmuls instead ("einsum" form, picked inside the program by
`lax.platform_dependent`; see `_pool_flat`): the forward contracts each box's
`EINSUM_WINDOW`-square window (gathered as row slices) with one-hot row and column weight
matrices, the backward is `Wy^T (ct Wx)` per level over the whole map, so neither holds a
scatter (a scatter-add is slow on TPU and atomic, non-deterministic, on GPU). Its backward costs
`2 N S_h H W C` FLOPs per level and image, which the MXU/tensor cores absorb; the gather form
stays on CPU, where it is the faster one. Scan chunks are chosen per platform the same way.

The variants change only the plan and the reduction. Adaptive sampling plans `max_samples` samples
per bin side for every box and gives those beyond the box's own g weight 0 (the cost is that of
`sampling_ratio=max_samples`: about 10x the default's at the default cap 8). `reduce="max"` forms
each sample's bilinear value from the same gathered pairs, takes the maximum over the bin's samples
and keeps the index of the first maximal one per channel for its backward pass, which scatters the
cotangent to that sample's four pixels only. RoIWarp snaps the boxes to the grid before planning.

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

REDUCES = ("ave", "max")
# Cap on the samples per bin side of adaptive sampling (`sampling_ratio=0`): with FPN level mapping
# a box's side on its map is below 28 pixels on every level but the coarsest unless it is elongated,
# so 7x7 bins need g <= 4, and 8 also covers aspect ratios up to 4 and the coarsest level's boxes
# up to 56 map pixels (1792 image pixels at stride 32). The cost grows with the cap squared.
MAX_SAMPLES = 8

# Boxes per step of the forward gather and the backward scatter, by backend. One step's gathered
# neighbours take chunk * S_h * S_w * 4 g^2 * C * 4 bytes (0.8 MB per box at 7x7, g = 2, C = 256).
# On CPU, chunks that stay in cache measured fastest (1-2 boxes: 2x faster than 32); accelerators
# want wide steps instead (a guess, not yet measured: 256).
_CHUNK = {"cpu": 2}
_CHUNK_ACCELERATOR = 256
# One box's gathered bytes in a step of the default RoIAlign (7x7, g = 2, C = 256) that the chunks
# above were tuned for. The other forms (adaptive, max, RoIWarp, RoIPool) gather more per box and
# shrink their chunks in proportion; the default RoIAlign keeps them as they are.
_CHUNK_BOX_BYTES = 7 * 7 * 16 * 256 * 4


def _chunk_size(n: int, box_bytes: int = None, platform: str = "cpu") -> int:
  """Boxes per scan step for N boxes on `platform` ("cpu" or another: an accelerator), each
  gathering `box_bytes` per step (None: the default RoIAlign's chunks)."""
  chunk = _CHUNK.get(platform, _CHUNK_ACCELERATOR)
  if box_bytes is not None:
    chunk = min(chunk, max(1, chunk * _CHUNK_BOX_BYTES // max(int(box_bytes), 1)))
  return _at_most(n, max(1, chunk))


def _at_most(n, chunk: int) -> int:
  """min(n, chunk) for a static N; `chunk` for a symbolic one (jax.export's batch `b`: the last
  chunk is padded either way)."""
  return max(1, min(n, chunk)) if isinstance(n, int) else chunk


def _by_platform_chunks(fn, n: int, box_bytes: int, *args):
  """`fn(chunk, *args)` with the chunk size of the platform the program is lowered for, chosen
  inside the program (`lax.platform_dependent`), not from the host's default backend."""
  cpu, accelerator = (_chunk_size(n, box_bytes, p) for p in ("cpu", "accelerator"))
  if cpu == accelerator:
    return fn(cpu, *args)
  return lax.platform_dependent(*args, cpu=functools.partial(fn, cpu),
                                default=functools.partial(fn, accelerator))


def _pair(output_size: OutputSize) -> Tuple[int, int]:
  """Returns `(S_h, S_w)` from an int or a pair of ints; raises ValueError otherwise."""
  if isinstance(output_size, int):
    size = (output_size, output_size)
  else:
    size = tuple(output_size)
  if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
    raise ValueError(f"output_size must be a positive int or a pair of them, got {output_size!r}")
  return size


def _check_sampling(sampling_ratio: int, max_samples: int, reduce: str) -> None:
  """Raises ValueError unless `sampling_ratio` is a static int >= 0 (0: adaptive),
  `max_samples` a static int >= 1 and `reduce` one of `REDUCES`."""
  if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int) or sampling_ratio < 0:
    raise ValueError("sampling_ratio must be an int >= 1, or 0 for torchvision's adaptive "
                     f"ceil(roi_size / output_size) samples per bin; got {sampling_ratio!r}")
  if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
    raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
  if reduce not in REDUCES:
    raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")


def _check_boxes(boxes: Array) -> None:
  """Raises ValueError unless `boxes` is `[N, 4]`."""
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2), got shape {boxes.shape}")


class _Plan(NamedTuple):
  """Where every box samples, one axis at a time (bilinear sampling is separable).

  `rows[n, k]` is the first of the two rows that row-sample k of box n reads, `row_pos[n, k]` the
  sample's clamped y in `[0, H - 1]` and `row_in[n, k]` its weight factor: `1 / g^2`, or 0 when the
  sample lies outside `[-1, H]`; the same for columns. (For `reduce="max"` the factor is 1 or 0,
  and `row_ok` / `col_ok` mark the samples that exist under adaptive sampling, None when all do;
  for adaptive averages the factor is `1 / count`, and 0 for samples that do not exist.) The
  bilinear weights of rows `(rows, rows + 1)` are `(1 - f, f)` with `f = clip(row_pos - rows, 0,
  1)`. They are derived from
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
  row_ok: Array = None  # [N, S_h * g] bool or None (reduce="max" only).
  col_ok: Array = None  # [N, S_w * g] bool or None (reduce="max" only).


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


def _divisor(like: Array, value: float) -> Array:
  """`value` in the shape of `like`, opaque to the compiler, so that dividing by it stays a true
  division (as in the C++ kernels).

  XLA turns a division by a constant, or by a broadcast (which an unbatched divisor becomes under
  `vmap`), into a multiplication by the rounded reciprocal, which moves sample positions and bin
  edges by an ulp or more (and so a RoIPool bin edge across an integer). The divisor is built from
  `like`, so that `vmap` batches it along with the numerator, and passed through an optimization
  barrier, so that it is not a constant.
  """
  return lax.optimization_barrier(jnp.where(jnp.isnan(like), value, value).astype(jnp.float32))


def _axis_samples(start: Array, length: Array, extent: Array, bins: int, grid: int,
                  adaptive: bool = False) -> Tuple[Array, Array, Array, Array]:
  """Sample positions along one axis (rows or columns) of every box, as in torchvision's kernel.

  Sample `i` of bin `p` sits at `(start + p * bin) + ((i + 0.5) * bin) / grid` with
  `bin = length / bins` (the kernel's float32 operations, in its order). A sample outside
  `[-1, extent]` contributes nothing; otherwise it is clamped to `[0, extent - 1]` (the kernel's
  `y <= 0 -> 0` and `y_low >= H - 1 -> y = H - 1`) and split between two neighbouring pixels.

  Adaptive (`sampling_ratio=0`): each box has its own `g = min(ceil(bin), grid)` samples per bin
  (torchvision's `roi_bin_grid = ceil(roi_size / S)`, capped), placed with that g; samples
  `i >= g` of the static `grid` exist only as padding.

  Args:
    start: [N] float32 box start in feature-map pixels (x1 or y1 times the scale, minus the offset).
    length: [N] float32 box extent in feature-map pixels (already at least 1 when not aligned).
    extent: [N] int32 size of the box's feature map along this axis (W or H), >= 1.
    bins: S, number of output bins along this axis (static).
    grid: g, samples per bin along this axis (static).
    adaptive: whether `grid` is the cap of adaptive sampling rather than g itself (static).

  Returns:
    first: [N, S * g] int32 first of the two pixels each sample reads, in `[0, max(extent - 2, 0)]`,
      so that `first + 1` lies in the map whenever `extent >= 2`.
    pos: [N, S * g] float32 clamped sample position in `[0, extent - 1]`.
    inside: [N, S * g] bool, whether the sample lies in `[-1, extent]`.
    count: [N] float32 samples per bin of each box (in `[0, grid]`) when `adaptive`, else None.
    exists: [N, S * g] bool, whether sample `i < count` when `adaptive`, else None.
  """
  n = start.shape[0]
  # True divisions, as in the kernel (see `_divisor`).
  bin_size = length / _divisor(length, bins)
  p = jnp.arange(bins, dtype=jnp.float32)[None, :, None]
  i = jnp.arange(grid, dtype=jnp.float32)[None, None, :]
  step = (i + 0.5) * bin_size[:, None, None]  # [N, 1, g]
  count = exists = None
  if adaptive:
    # ceil of the same float32 quotient as the kernel's `ceil(roi_height / pooled_height)`; 0 for
    # empty (aligned) or inverted boxes, whose bins then average nothing.
    count = jnp.clip(jnp.ceil(bin_size), 0.0, float(grid))
    count = jnp.where(jnp.isnan(count), 0.0, count)
    step = step / jnp.maximum(count, 1.0)[:, None, None]  # Data-dependent: a true division.
    exists = jnp.broadcast_to(i < count[:, None, None], (n, bins, grid)).reshape(n, bins * grid)
  else:
    step = step / _divisor(step, grid)
  coord = (start[:, None, None] + _rounded(p * bin_size[:, None, None])) + step
  coord = coord.reshape(n, bins * grid)
  size = extent.astype(jnp.float32)[:, None]
  inside = (coord >= -1.0) & (coord <= size)
  last = (extent - 1)[:, None]
  pos = jnp.clip(coord, 0.0, last.astype(jnp.float32))
  first = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, jnp.maximum(last - 1, 0))
  return first, pos, inside, count, exists


def _quantize_boxes(boxes: Array, scale: Array) -> Tuple[Array, Array]:
  """Boxes snapped to the feature grid as torchvision's RoIPool kernel snaps them.

  `start = round(x1 * scale)`, `end = round(x2 * scale)` (C++ `std::round`: halves away from zero,
  not to even), `size = max(end - start + 1, 1)`: the box covers pixels `start .. start + size - 1`.

  Args:
    boxes: [N, 4] float32 (x1, y1, x2, y2) input pixels.
    scale: [N] float32 spatial scale of each box's feature map.

  Returns:
    start: [N, 2] int32 (x, y) first pixel.
    size: [N, 2] int32 (w, h) >= 1 pixels covered.
  """
  scaled = lax.round(_rounded(boxes * scale[:, None]), lax.RoundingMethod.AWAY_FROM_ZERO)
  scaled = scaled.astype(jnp.int32)
  start = scaled[:, :2]
  return start, jnp.maximum(scaled[:, 2:] - start + 1, 1)


def _sampling_plan(boxes: Array, scale: Array, height: Array, width: Array,
                   offset: Array, size: Tuple[int, int], sampling_ratio: int,
                   aligned: bool, stride: Array = None, *, max_samples: int = MAX_SAMPLES,
                   reduce: str = "ave", quantize: bool = False) -> _Plan:
  """Per-axis sample positions of every box (see `_Plan`).

  Args:
    boxes: [N, 4] float32 (x1, y1, x2, y2) input pixels.
    scale: [N] float32 spatial scale of each box's feature map.
    height: [N] int32 height of each box's feature map.
    width: [N] int32 width of each box's feature map (also its row stride in the flat array unless
      `stride` is given).
    offset: [N] int32 flat position of pixel (0, 0) of each box's feature map.
    size: (S_h, S_w) output size (static).
    sampling_ratio: g >= 1 samples per bin along each axis, or 0: adaptive (static).
    aligned: whether to shift the box by -0.5 pixel (torchvision's `aligned=True`).
    stride: [N] int32 row stride in the flat array when the map's valid `width` is smaller than
      its stored width (bucketed canvases), else None.
    max_samples: the cap on adaptive samples per bin side, the plan's g when `sampling_ratio=0`.
    reduce: "ave" (weights fold in the 1 / count of the mean) or "max" (weights 1 or 0).
    quantize: snap the boxes to the grid first (RoIWarp, `_quantize_boxes`); `aligned` must be
      False then.

  Returns:
    The `_Plan` of the N boxes.
  """
  boxes = lax.stop_gradient(boxes.astype(jnp.float32))
  if quantize:
    start, length = _quantize_boxes(boxes, scale)
    x1, y1 = jnp.moveaxis(start.astype(jnp.float32), -1, 0)
    roi_w, roi_h = jnp.moveaxis(length.astype(jnp.float32), -1, 0)
  else:
    shift = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = jnp.moveaxis(_rounded(boxes * scale[:, None]) - shift, -1, 0)
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:  # The legacy mode forces malformed boxes to be at least 1x1.
      roi_w = jnp.maximum(roi_w, 1.0)
      roi_h = jnp.maximum(roi_h, 1.0)
  adaptive = sampling_ratio == 0
  grid = max_samples if adaptive else sampling_ratio
  rows, row_pos, row_in, row_n, row_ok = _axis_samples(y1, roi_h, height, size[0], grid, adaptive)
  cols, col_pos, col_in, col_n, col_ok = _axis_samples(x1, roi_w, width, size[1], grid, adaptive)
  stride = width if stride is None else stride
  if reduce == "max":  # A sample outside the map is 0 and takes part; padding samples do not.
    return _Plan(offset, stride, rows, row_pos, row_in.astype(jnp.float32), cols, col_pos,
                 col_in.astype(jnp.float32), row_ok, col_ok)
  if adaptive:  # The kernel's count = max(g_h * g_w, 1); padding samples weigh 0.
    weight = 1.0 / jnp.maximum(row_n * col_n, 1.0)
    row_in = jnp.where(row_in & row_ok, weight[:, None], 0.0).astype(jnp.float32)
    return _Plan(offset, stride, rows, row_pos, row_in, cols, col_pos,
                 (col_in & col_ok).astype(jnp.float32))
  # The kernel divides each bin's sum by the sample count g^2; fold that into the row weights.
  row_in = jnp.where(row_in, 1.0 / (sampling_ratio * sampling_ratio), 0.0).astype(jnp.float32)
  return _Plan(offset, stride, rows, row_pos, row_in, cols, col_pos, col_in.astype(jnp.float32))


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


def _sample_ok(plan: _Plan, size: Tuple[int, int], grid: int) -> Array:
  """[b * S_h * S_w, g * g] bool: which samples of each bin exist (adaptive), or None (all do)."""
  if plan.row_ok is None:
    return None
  s_h, s_w = size
  b = plan.rows.shape[0]
  ok = plan.row_ok.reshape(b, s_h, 1, grid, 1) & plan.col_ok.reshape(b, 1, s_w, 1, grid)
  return ok.reshape(b * s_h * s_w, grid * grid)


def _max_forward(flat: Array, plan: _Plan, size: Tuple[int, int], grid: int,
                 chunk: int) -> Tuple[Array, Array]:
  """Forward of `_pool_flat(reduce="max")`, scanning over chunks of boxes.

  Returns:
    out: [N, S_h, S_w, C] float32 maximum over each bin's existing samples (0 if none exists).
    best: [N, S_h, S_w, C] uint8 (int32 beyond 256 samples) index `i * g + j` of the first sample
      holding the maximum, per channel.
  """
  n = plan.rows.shape[0]
  s_h, s_w = size
  positions, channels = flat.shape
  chunks = -(-n // chunk)
  samples = grid * grid
  bins = chunk * s_h * s_w
  index_dtype = jnp.uint8 if samples <= 256 else jnp.int32

  def body(_, plan_chunk):
    starts, weights = _expand(plan_chunk, size, grid)
    starts = jnp.minimum(starts, positions - 2)
    values = lax.gather(flat, starts[..., None], _PAIR_GATHER, (2, channels),
                        mode="promise_in_bounds")  # [b, S_h, S_w, 2 g^2, 2, C]
    values = values.reshape(bins, samples, 4, channels).astype(jnp.float32)
    # Each sample's bilinear value, as the kernel forms it: w1 v1 + w2 v2 + w3 v3 + w4 v4.
    value = jnp.sum(weights.reshape(bins, samples, 4, 1) * values, axis=2)  # [bins, g^2, C]
    ok = _sample_ok(plan_chunk, size, grid)
    if ok is not None:
      value = jnp.where(ok[..., None], value, -jnp.inf)
    out = jnp.max(value, axis=1)
    if ok is not None:
      out = jnp.where(jnp.any(ok, axis=1)[:, None], out, 0.0)
    best = jnp.argmax(value, axis=1).astype(index_dtype)  # The first maximum.
    return None, (out.reshape(chunk, s_h, s_w, channels), best.reshape(chunk, s_h, s_w, channels))

  _, (out, best) = lax.scan(body, None,
                            jax.tree.map(lambda a: _chunked(a, chunks, chunk), plan))
  shape = (chunks * chunk, s_h, s_w, channels)
  return out.reshape(shape)[:n], best.reshape(shape)[:n]


def _max_backward(positions: int, plan: _Plan, best: Array, cotangent: Array,
                  size: Tuple[int, int], grid: int, chunk: int) -> Array:
  """Backward of `_pool_flat(reduce="max")`: each bin's cotangent goes to its first maximal sample
  (per channel) and from there to that sample's four pixels with the bilinear weights."""
  n = plan.rows.shape[0]
  s_h, s_w = size
  channels = cotangent.shape[-1]
  chunks = -(-n // chunk)
  samples = grid * grid
  bins = chunk * s_h * s_w
  xs = jax.tree.map(lambda a: _chunked(a, chunks, chunk), (plan, best, cotangent))

  def body(grad, x):
    plan_chunk, best_chunk, ct = x
    starts, weights = _expand(plan_chunk, size, grid)
    starts = jnp.minimum(starts, positions - 2)
    pick = best_chunk.astype(jnp.int32).reshape(bins, 1, channels) == jnp.arange(
        samples, dtype=jnp.int32)[None, :, None]  # [bins, g^2, C]
    ok = _sample_ok(plan_chunk, size, grid)
    if ok is not None:  # A bin without samples is 0 and has no gradient.
      pick &= jnp.any(ok, axis=1)[:, None, None]
    ct = jnp.where(pick, ct.astype(jnp.float32).reshape(bins, 1, channels), 0.0)
    updates = ct[:, :, None, :] * weights.reshape(bins, samples, 4, 1)  # [bins, g^2, 4, C]
    updates = updates.reshape(chunk, s_h, s_w, 2 * samples, 2, channels)
    return lax.scatter_add(grad, starts[..., None], updates, _PAIR_SCATTER,
                           mode="promise_in_bounds"), None

  grad, _ = lax.scan(body, jnp.zeros((positions, channels), jnp.float32), xs)
  return grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pool_flat_max_vjp(flat, plan, size, grid, chunk):
  """`_pool_flat(reduce="max")` with a scatter-add backward to the first maxima."""
  return _max_forward(flat, plan, size, grid, chunk)[0].astype(flat.dtype)


def _pool_flat_max_fwd(flat, plan, size, grid, chunk):
  out, best = _max_forward(flat, plan, size, grid, chunk)
  return out.astype(flat.dtype), (jnp.zeros((flat.shape[0], 0), flat.dtype), plan, best)


def _pool_flat_max_bwd(size, grid, chunk, residuals, cotangent):
  like, plan, best = residuals
  grad = _max_backward(like.shape[0], plan, best, cotangent, size, grid, chunk)
  return grad.astype(like.dtype), None  # The plan comes from the boxes: a constant.


_pool_flat_max_vjp.defvjp(_pool_flat_max_fwd, _pool_flat_max_bwd)


# ---------------------------------------------------------------------------------------------
# The accelerator form: matmuls with one-hot weights, no scatter (see `_pool_flat`).

# Window side (pixels of the box's map) of the einsum form's forward: each box reads one
# EINSUM_WINDOW x EINSUM_WINDOW window (EINSUM_WINDOW row slices of the flat array). A box fits
# when its sample rows and columns (with their second neighbours) span at most that (with FPN
# level mapping a box's side on its level is below 28 pixels unless its aspect ratio passes ~5); if
# any box of the call does not fit, the whole forward takes the gather form instead (`lax.cond`),
# which is exact for every box.
EINSUM_WINDOW = 64
# Bytes of one scan step's largest intermediate in the einsum form, on accelerators.
_EINSUM_STEP_BYTES = 64 << 20
METHODS = ("auto", "gather", "einsum")

_ROW_GATHER = lax.GatherDimensionNumbers(offset_dims=(2, 3), collapsed_slice_dims=(),
                                         start_index_map=(0,))


class _Layout(NamedTuple):
  """Static shape of the flat array's maps (see `_flatten_maps`), for the einsum backward."""
  batch: int  # B images per level block.
  shapes: Tuple[Tuple[int, int], ...]  # (H_l, W_l) stored size of each level's maps.
  starts: Tuple[int, ...]  # flat row of level l's image 0, pixel (0, 0).
  positions: int  # P, rows of the flat array (pad rows included).


def _axis_weights(first: Array, pos: Array, factor: Array, bins: int, grid: int, extent: int,
                  origin: Array = None) -> Array:
  """One axis of the separable bilinear weights as a dense matrix (one-hot compares, no scatter).

  Args:
    first, pos, factor: [b, S * g] a `_Plan` axis (rows, row_pos, row_in or the columns).
    bins, grid: S and g (static).
    extent: pixels the matrix spans (static): the window side, or the map's height or width.
    origin: [b] int32 pixel of the matrix's column 0 (the window's start), or None: 0.

  Returns:
    [b, S, extent] float32: the weight of pixel `origin + k` in bin p (summed over the bin's g
    samples and their two neighbours; pixels outside the span weigh 0).
  """
  b = first.shape[0]
  weights = _pair_weights(first, pos, factor)  # [b, S * g, 2]
  pixel = first[..., None] + jnp.arange(2, dtype=jnp.int32)
  if origin is not None:
    pixel = pixel - origin[:, None, None]
  hot = pixel[..., None] == jnp.arange(extent, dtype=jnp.int32)  # [b, S * g, 2, extent]
  dense = jnp.where(hot, weights[..., None], 0.0).reshape(b, bins, grid * 2, extent)
  return jnp.sum(dense, axis=2)


def _window_forward(flat: Array, plan: _Plan, size: Tuple[int, int], grid: int, window: int,
                    chunk: int) -> Array:
  """Forward of the einsum form for boxes whose samples fit the window: per box, `window` row
  slices of the flat array form a [window, window, C] window, contracted with the row and column
  weight matrices. -> [N, S_h, S_w, C] float32."""
  n = plan.rows.shape[0]
  s_h, s_w = size
  channels = flat.shape[-1]
  chunks = -(-n // chunk)
  # A row slice may run past the last map's last pixel (into weight-0 columns): pad for it.
  padded = jnp.concatenate([flat, jnp.zeros((window, channels), flat.dtype)], axis=0)

  def body(_, p):
    r0 = jnp.min(p.rows, axis=1)
    c0 = jnp.min(p.cols, axis=1)
    rows = r0[:, None] + jnp.arange(window, dtype=jnp.int32)
    starts = p.offset[:, None] + rows * p.stride[:, None] + c0[:, None]  # [b, window]
    # Rows past the flat array (past the last map: weight 0) are clamped by the gather.
    win = lax.gather(padded, starts[..., None], _ROW_GATHER, (window, channels),
                     mode="clip").astype(jnp.float32)  # [b, window, window, C]
    wy = _axis_weights(p.rows, p.row_pos, p.row_in, s_h, grid, window, r0)  # [b, S_h, window]
    wx = _axis_weights(p.cols, p.col_pos, p.col_in, s_w, grid, window, c0)  # [b, S_w, window]
    hi = lax.Precision.HIGHEST
    t = jnp.einsum("npa,nakc->npkc", wy, win, precision=hi)
    return None, jnp.einsum("nqk,npkc->npqc", wx, t, precision=hi)

  _, out = lax.scan(body, None, jax.tree.map(lambda a: _chunked(a, chunks, chunk), plan))
  return out.reshape((chunks * chunk, s_h, s_w, channels))[:n]


def _fits_window(plan: _Plan, window: int) -> Array:
  """Whether every box's sample rows and columns (with their second neighbour) span at most
  `window` pixels: scalar bool."""
  span_h = jnp.max(plan.rows, axis=1) - jnp.min(plan.rows, axis=1) + 2
  span_w = jnp.max(plan.cols, axis=1) - jnp.min(plan.cols, axis=1) + 2
  return jnp.all((span_h <= window) & (span_w <= window))


def _dense_backward(layout: _Layout, level: Array, plan: _Plan, cotangent: Array,
                    size: Tuple[int, int], grid: int) -> Array:
  """Backward of the einsum form: per level, the map's gradient is
  `sum_boxes Wy^T (ct Wx)` with one-hot weight matrices over the whole map (boxes of other levels
  weigh 0), two matmuls per chunk of boxes, accumulated in float32. -> [P, C] float32."""
  b = layout.batch
  n = plan.rows.shape[0] // b
  s_h, s_w = size
  channels = cotangent.shape[-1]

  def per_image(a):  # [B * N, ...] -> [N, B, ...]: the scan runs over boxes, B stays whole
    return jnp.swapaxes(a.reshape((b, n) + a.shape[1:]), 0, 1)

  axes = (plan.rows, plan.row_pos, plan.row_in, plan.cols, plan.col_pos, plan.col_in, level,
          cotangent)
  axes = [per_image(a) for a in axes]
  grads = []
  hi = lax.Precision.HIGHEST
  for index, (height, width) in enumerate(layout.shapes):
    # Largest step intermediate: [chunk, B, S_h, W, C] float32 (the batch width counts).
    chunk = _at_most(n, max(1, _EINSUM_STEP_BYTES // (b * s_h * width * channels * 4)))
    chunks = -(-n // chunk)
    xs = [_chunked(a, chunks, chunk) for a in axes]

    def body(acc, x, index=index, height=height, width=width):
      rows, row_pos, row_in, cols, col_pos, col_in, lev, ct = x
      flat2 = lambda a: a.reshape((chunk * b,) + a.shape[2:])  # noqa: E731
      row_in = jnp.where(lev[..., None] == index, row_in, 0.0)  # boxes of this level only
      wy = _axis_weights(flat2(rows), flat2(row_pos), flat2(row_in), s_h, grid, height)
      wx = _axis_weights(flat2(cols), flat2(col_pos), flat2(col_in), s_w, grid, width)
      wy = wy.reshape(chunk, b, s_h, height)
      wx = wx.reshape(chunk, b, s_w, width)
      u = jnp.einsum("nbpqc,nbqw->nbpwc", ct.astype(jnp.float32), wx, precision=hi)
      return acc + jnp.einsum("nbph,nbpwc->bhwc", wy, u, precision=hi), None

    acc, _ = lax.scan(body, jnp.zeros((b, height, width, channels), jnp.float32), xs)
    grads.append(acc.reshape(b * height * width, channels))
  used = layout.starts[-1] + b * layout.shapes[-1][0] * layout.shapes[-1][1]
  if layout.positions > used:  # the pad rows of `_flatten_maps` get no gradient
    grads.append(jnp.zeros((layout.positions - used, channels), jnp.float32))
  return jnp.concatenate(grads, axis=0) if len(grads) > 1 else grads[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _pool_flat_einsum(flat, plan, level, layout, size, grid, window, chunk):
  """The einsum form of `_pool_flat` (reduce "ave"): window forward (or the gather form when a box
  does not fit the window), dense one-hot backward; no scatter in either."""
  out = lax.cond(_fits_window(plan, window),
                 lambda: _window_forward(flat, plan, size, grid, window, chunk),
                 lambda: _pool_forward(flat, plan, size, grid, chunk))
  return out.astype(flat.dtype)


def _pool_flat_einsum_fwd(flat, plan, level, layout, size, grid, window, chunk):
  out = _pool_flat_einsum(flat, plan, level, layout, size, grid, window, chunk)
  return out, (jnp.zeros((flat.shape[0], 0), flat.dtype), plan, level)


def _pool_flat_einsum_bwd(layout, size, grid, window, chunk, residuals, cotangent):
  like, plan, level = residuals
  grad = _dense_backward(layout, level, plan, cotangent, size, grid)
  return grad.astype(like.dtype), None, None  # plan and levels come from the boxes: constants


_pool_flat_einsum.defvjp(_pool_flat_einsum_fwd, _pool_flat_einsum_bwd)


def _pool_flat(flat: Array, plan: _Plan, size: Tuple[int, int], grid: int,
               reduce: str = "ave", adaptive: bool = False, *, level: Array = None,
               layout: "_Layout" = None, method: str = "auto") -> Array:
  """Bilinear RoI pooling from a flat feature array; differentiable w.r.t. `flat` only.

  Two forms, equal up to float32 round-off:
  - "gather" (CPU's): per chunk of boxes, gather every sample's neighbour pairs and contract them
    with the weights; the backward scatter-adds (see the module docstring).
  - "einsum" (accelerators'): matmuls with one-hot weight matrices, no scatter. Forward: each box's
    `EINSUM_WINDOW`-square window, gathered as that many row slices, contracted with its row and
    column weights (if some box's samples span more than the window, the call takes the gather
    forward instead, exact for all boxes). Backward: per level, `Wy^T (ct Wx)` with weight
    matrices over the whole map, accumulated over chunks of boxes: no scatter, at the cost of
    `2 N S_h H W C` FLOPs per level and image (the gather form's backward touches `16 N S_h S_w
    C` values, but as a scatter).
  "auto" picks the gather form on CPU and the einsum form elsewhere inside the program
  (`lax.platform_dependent`), so a program lowered for TPU or GPU from a CPU host gets it. The
  max reduction has no separable form and always gathers.

  Args:
    flat: [P, C] features (any float dtype), one or more maps flattened row-major and concatenated,
      P >= 2. Every pair `(start, start + 1)` that `_expand` names, top and bottom, must lie inside
      it (the callers pad maps of height or width 1).
    plan: `_Plan` of the N boxes (not differentiated), made for this `reduce`.
    size: (S_h, S_w) output size (static).
    grid: g samples per bin along each axis (static; the cap for adaptive plans).
    reduce: "ave": the weighted sum (the mean: the weights hold 1 / count); "max": the maximum over
      each bin's samples, the gradient going to the first maximum.
    adaptive: whether the plan is adaptive (only the chunk size depends on it: the default
      RoIAlign's chunks stay as they were tuned).
    level: [N] int32 map level of each box (the einsum form's backward).
    layout: the flat array's `_Layout` (the einsum form's backward).
    method: "auto", "gather" or "einsum" (static).

  Returns:
    [N, S_h, S_w, C] pooled features in `flat`'s dtype, accumulated in float32.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  n = plan.rows.shape[0]
  if n == 0:
    return jnp.zeros((0,) + tuple(size) + (flat.shape[-1],), flat.dtype)
  box_bytes = None
  if reduce == "max" or adaptive:
    box_bytes = size[0] * size[1] * 4 * grid * grid * flat.shape[-1] * 4
  if reduce == "max":
    return _by_platform_chunks(lambda chunk, flat, plan: _pool_flat_max_vjp(
        flat, plan, tuple(size), grid, chunk), n, box_bytes, flat, plan)
  if layout is None or method == "gather":
    return _by_platform_chunks(lambda chunk, flat, plan: _pool_flat_vjp(
        flat, plan, tuple(size), grid, chunk), n, box_bytes, flat, plan)
  chunk = _chunk_size(n, box_bytes, "cpu")  # the gather form of "auto" runs on CPU only
  # The whole map when a map-sized window costs no more than the default window of 256 channels
  # (then every box fits: e.g. the mask targets' one-channel crops), else `EINSUM_WINDOW`.
  side = max(max(shape) for shape in layout.shapes)
  window = side if side * side * flat.shape[-1] <= EINSUM_WINDOW ** 2 * 256 else EINSUM_WINDOW
  wide = _at_most(n, max(1, _EINSUM_STEP_BYTES // (window * window * flat.shape[-1] * 4)))

  def einsum_form(flat, plan, level):
    return _pool_flat_einsum(flat, plan, level, layout, tuple(size), grid, window, wide)

  if method == "einsum":
    return einsum_form(flat, plan, level)

  def gather_form(flat, plan, level):
    return _pool_flat_vjp(flat, plan, tuple(size), grid, chunk)

  return lax.platform_dependent(flat, plan, level, cpu=gather_form, default=einsum_form)


class _BoxMaps(NamedTuple):
  """Where the map each box reads lies in the flat array of all maps (see `_flatten_maps`)."""
  scale: Array  # [N] float32 spatial scale of the box's map.
  height: Array  # [N] int32 valid height of the box's map.
  width: Array  # [N] int32 valid width of the box's map.
  offset: Array  # [N] int32 flat position of the map's pixel (0, 0).
  stride: Array  # [N] int32 row stride when `extents` narrow the maps, else None (= width).
  level: Array  # [N] int32 index of the box's map in `features`.


def _flatten_maps(features: Sequence[Array], boxes: Array, scales: Sequence[float],
                  canonical_scale: float, canonical_level: int, eps: float,
                  extents: Array = None, pad: bool = True
                  ) -> Tuple[Array, Array, _BoxMaps, _Layout]:
  """All `B * L` maps as one flat array, and where each box's map lies in it.

  The batch is handled like the levels: every box carries the offset of its own image's map at its
  own level (from `map_roi_levels`), so a batch costs no more than the same number of boxes of one
  image (a `vmap` would batch the gathers and scatters instead).

  Args:
    features: L maps `[B, H_l, W_l, C]`, finest first, one dtype.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels.
    scales, canonical_scale, canonical_level, eps: as in `multilevel_roi_align`.
    extents: [B, L, 2] int32 valid (height, width) of each image's map per level, or None (the
      whole stored map is valid).
    pad: append zero rows when a map has height or width 1 (for the bilinear pairs).

  Returns:
    flat: [P, C] the maps flattened row-major and concatenated (level-major, then image).
    boxes: [B * N, 4] the boxes, image-major.
    maps: `_BoxMaps` of the B * N boxes.
    layout: the `_Layout` of `flat`.
  """
  batch, n = boxes.shape[:2]
  channels = features[0].shape[-1]
  heights = [f.shape[1] for f in features]
  widths = [f.shape[2] for f in features]
  offsets = [0]
  for h, w in zip(heights, widths):
    offsets.append(offsets[-1] + batch * h * w)
  flat = [f.reshape(-1, channels) for f in features]
  if pad and min(heights + widths) == 1:
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
  layout = _Layout(batch, tuple(zip(heights, widths)), tuple(offsets[:-1]), flat.shape[0])
  return flat, boxes, _BoxMaps(per_box(scales, jnp.float32), height, width, offset, stride,
                               level), layout


def _pool_levels(features: Sequence[Array], boxes: Array, size: Tuple[int, int],
                 scales: Sequence[float], sampling_ratio: int, aligned: bool,
                 canonical_scale: float, canonical_level: int, eps: float,
                 extents: Array = None, *, reduce: str = "ave", max_samples: int = MAX_SAMPLES,
                 quantize: bool = False, method: str = "auto") -> Array:
  """The one implementation behind all the RoIAlign and RoIWarp forms (arguments already checked).

  Args:
    features: L maps `[B, H_l, W_l, C]`, finest first, one dtype.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels.
    size: (S_h, S_w).
    scales, sampling_ratio, aligned, canonical_scale, canonical_level, eps: as in
      `multilevel_roi_align`.
    extents: [B, L, 2] int32 valid (height, width) of each image's map per level, or None (the
      whole stored map is valid).
    reduce, max_samples: as in `roi_align`.
    quantize: RoIWarp's snapping of the boxes to the grid (see `roi_warp`).
    method: "auto", "gather" or "einsum" (see `_pool_flat`).

  Returns:
    [B, N, S_h, S_w, C] in the maps' dtype.
  """
  batch, n = boxes.shape[:2]
  flat, boxes, maps, layout = _flatten_maps(features, boxes, scales, canonical_scale,
                                            canonical_level, eps, extents)
  plan = _sampling_plan(boxes, maps.scale, maps.height, maps.width, maps.offset, size,
                        sampling_ratio, aligned, maps.stride, max_samples=max_samples,
                        reduce=reduce, quantize=quantize)
  adaptive = sampling_ratio == 0
  out = _pool_flat(flat, plan, size, max_samples if adaptive else sampling_ratio, reduce, adaptive,
                   level=maps.level, layout=layout, method=method)
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
              aligned: bool = False, *, reduce: str = "ave",
              max_samples: int = MAX_SAMPLES, method: str = "auto") -> Array:
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

  Adaptive sampling, `sampling_ratio=0` (torchvision's default): each box has its own
  `g_h = ceil(roi_h / S_h)`, `g_w = ceil(roi_w / S_w)` samples per bin side and divides by
  `max(g_h * g_w, 1)`, as torchvision does. Shapes stay static: every box carries `max_samples`
  samples per side and those with `i >= g` weigh 0, so the cost is that of
  `sampling_ratio=max_samples`. Equal to torchvision for boxes with `g_h, g_w <= max_samples`
  (with the default 8 and 7x7 bins: sides up to 56 map pixels); beyond it g is clamped to
  `max_samples` (that axis is sampled as with `sampling_ratio=max_samples`, positions and count
  alike), which differs from torchvision.

  `reduce="max"` (the Mask R-CNN paper's "RoIAlign max", Table 2c): each bin takes the maximum of
  its samples instead of their mean, with the same sample positions and border rules (a sample
  outside `[-1, H] x [-1, W]` has value 0 and takes part in the maximum; with adaptive sampling the
  padding samples `i >= g` do not, and a bin without samples is 0). The gradient goes to the first
  maximal sample in (row, column) order, per channel, and from it to its four pixels with the
  bilinear weights.

  Differentiable w.r.t. `features` (custom VJP: a float32 scatter-add of the same weights); the
  boxes are treated as constants (their gradient is zero), as in torchvision.

  Args:
    features: [H, W, C] one image's feature map, NHWC without the batch axis; any float dtype.
    boxes: [N, 4] float32 (x1, y1, x2, y2) in input pixels (before `spatial_scale`).
    output_size: S or (S_h, S_w), the crop size.
    spatial_scale: feature-map pixels per input pixel, e.g. 0.25 for a stride-4 map.
    sampling_ratio: g >= 1 samples per bin along each axis, or 0: adaptive (see above).
    aligned: use the pixel-centre convention (subtract 0.5 after scaling), as in Detectron2.
    reduce: "ave" (RoIAlign) or "max" (RoIAlign max).
    max_samples: the cap on adaptive samples per bin side (static; used when `sampling_ratio=0`).
    method: "auto" (default: the gather form on CPU, the scatter-free einsum form on TPU and GPU,
      chosen inside the program), "gather" or "einsum" (see `_pool_flat`; equal up to float32
      round-off; `reduce="max"` always gathers).

  Returns:
    [N, S_h, S_w, C] pooled features in `features`' dtype (accumulated in float32).

  Raises:
    ValueError: for `sampling_ratio < 0`, `max_samples < 1`, an unknown `reduce` or `method`, a
      bad `output_size`, or inputs of the wrong rank.
  """
  if features.ndim != 3:
    raise ValueError(f"features must be [H, W, C], got shape {features.shape}")
  return multilevel_roi_align([features], boxes, output_size, [spatial_scale],
                              sampling_ratio=sampling_ratio, aligned=aligned, reduce=reduce,
                              max_samples=max_samples, method=method)


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
  # A true division (see `_divisor`): 1 / 224 rounded would move boxes at level boundaries.
  scale = _divisor(s, canonical_scale)
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
                         eps: float = 1e-6, *, reduce: str = "ave",
                         max_samples: int = MAX_SAMPLES, method: str = "auto") -> Array:
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
    sampling_ratio: g >= 1 samples per bin along each axis, or 0: adaptive (see `roi_align`).
    aligned: torchvision's `aligned` (MultiScaleRoIAlign itself always uses False).
    canonical_scale, canonical_level, eps: see `map_roi_levels`.
    reduce, max_samples, method: as in `roi_align`.

  Returns:
    [N, S_h, S_w, C] pooled features in the maps' dtype (accumulated in float32).

  Raises:
    ValueError: for `sampling_ratio < 0`, `max_samples < 1`, an unknown `reduce`, a bad
      `output_size`, maps and scales that do not match (one scale per map, consecutive levels), or
      inputs of the wrong rank.
  """
  size = _pair(output_size)
  _check_sampling(sampling_ratio, max_samples, reduce)
  features, scales = list(features), [float(s) for s in scales]
  _check_levels(features, scales, rank=3)
  _check_boxes(boxes)
  out = _pool_levels([f[None] for f in features], boxes.astype(jnp.float32)[None], size, scales,
                     sampling_ratio, aligned, canonical_scale, canonical_level, eps,
                     reduce=reduce, max_samples=max_samples, method=method)
  return out[0]


def roi_align_batched(features: Array, boxes: Array, output_size: OutputSize,
                      spatial_scale: float = 1.0, sampling_ratio: int = 2,
                      aligned: bool = False, *, reduce: str = "ave",
                      max_samples: int = MAX_SAMPLES, method: str = "auto") -> Array:
  """`roi_align` over a batch: image b's boxes read only image b's map.

  Equal to `jax.vmap(roi_align)` over the leading axis, but implemented by flattening the batch
  into the core's flat array (see `_pool_levels`), which is ~2x faster than the vmap on CPU.

  Args:
    features: [B, H, W, C] feature maps (NHWC), any float dtype.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels; padding rows may hold anything finite
      (mask their outputs with the caller's `valid`).
    output_size, spatial_scale, sampling_ratio, aligned, reduce, max_samples, method: as in
      `roi_align`.

  Returns:
    [B, N, S_h, S_w, C] pooled features in `features`' dtype.

  Raises:
    ValueError: as `roi_align`, or if the batch sizes differ.
  """
  if features.ndim != 4:
    raise ValueError(f"features must be [B, H, W, C], got shape {features.shape}")
  return multilevel_roi_align_batched([features], boxes, output_size, [spatial_scale],
                                      sampling_ratio=sampling_ratio, aligned=aligned,
                                      reduce=reduce, max_samples=max_samples, method=method)


def multilevel_roi_align_batched(features: Sequence[Array], boxes: Array,
                                 output_size: OutputSize, scales: Sequence[float],
                                 sampling_ratio: int = 2, aligned: bool = False,
                                 canonical_scale: float = 224, canonical_level: int = 4,
                                 eps: float = 1e-6, extents: Array = None, *,
                                 reduce: str = "ave", max_samples: int = MAX_SAMPLES,
                                 method: str = "auto") -> Array:
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
    reduce, max_samples, method: as in `roi_align`.

  Returns:
    [B, N, S_h, S_w, C] pooled features in the maps' dtype.

  Raises:
    ValueError: as `multilevel_roi_align`, or if the batch sizes differ.
  """
  size = _pair(output_size)
  _check_sampling(sampling_ratio, max_samples, reduce)
  features, scales = list(features), [float(s) for s in scales]
  _check_batched(features, scales, boxes, extents)
  return _pool_levels(features, boxes.astype(jnp.float32), size, scales, sampling_ratio, aligned,
                      canonical_scale, canonical_level, eps, extents, reduce=reduce,
                      max_samples=max_samples, method=method)


def _check_batched(features: Sequence[Array], scales: Sequence[float], boxes: Array,
                   extents: Array) -> None:
  """Raises ValueError unless the batched forms' maps, boxes and extents agree."""
  _check_levels(features, scales, rank=4)
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features[0].shape[0]:
    raise ValueError(f"boxes must be [B, N, 4] with the maps' B = {features[0].shape[0]}, got "
                     f"shape {boxes.shape}")
  if extents is not None and jnp.shape(extents) != (boxes.shape[0], len(features), 2):
    raise ValueError(f"extents must be [B, L, 2] = [{boxes.shape[0]}, {len(features)}, 2], got "
                     f"shape {jnp.shape(extents)}")


def roi_warp(features: Array, boxes: Array, output_size: OutputSize,
             spatial_scale: float = 1.0, sampling_ratio: int = 2, *, reduce: str = "ave",
             max_samples: int = MAX_SAMPLES) -> Array:
  """RoIWarp (Mask R-CNN paper, Table 2c): RoIPool's quantized box, sampled bilinearly.

  Definition: the box is first snapped to the feature grid exactly as `roi_pool` snaps it,
  `x0 = round(x1 * spatial_scale)`, `x_end = round(x2 * spatial_scale)` (halves away from zero),
  `w = max(x_end - x0 + 1, 1)` (the box covers pixels `x0 .. x_end`), and the same for y. Then the
  box `[x0, x0 + w) x [y0, y0 + h)` in map pixels is pooled exactly as `roi_align` with
  `aligned=False` pools a box: `S_h x S_w` bins of size `h / S_h x w / S_w`, g x g bilinear
  samples per bin at `y0 + (p + (i + 0.5) / g) * h / S_h` (the same for x), a sample outside
  `[-1, H] x [-1, W]` having value 0, others clamped into the map; the bin is the mean of its
  samples (`reduce="ave"`) or their maximum (`reduce="max"`, the gradient going to the first
  maximal sample). Adaptive sampling (`sampling_ratio=0`) uses `g = ceil(h / S_h)` (and
  `ceil(w / S_w)`) of the quantized box, capped at `max_samples` as in `roi_align`.

  Differentiable w.r.t. `features`; the boxes are constants.

  Args:
    features: [H, W, C] one image's feature map; any float dtype.
    boxes: [N, 4] float32 (x1, y1, x2, y2) input pixels (before `spatial_scale`).
    output_size: S or (S_h, S_w).
    spatial_scale: feature-map pixels per input pixel.
    sampling_ratio: g >= 1 samples per bin side, or 0: adaptive.
    reduce: "ave" or "max".
    max_samples: the cap on adaptive samples per bin side (static).

  Returns:
    [N, S_h, S_w, C] in `features`' dtype (accumulated in float32).

  Raises:
    ValueError: as `roi_align`.
  """
  if features.ndim != 3:
    raise ValueError(f"features must be [H, W, C], got shape {features.shape}")
  _check_boxes(boxes)
  return multilevel_roi_warp_batched([features[None]], boxes[None], output_size, [spatial_scale],
                                     sampling_ratio, reduce=reduce, max_samples=max_samples)[0]


def multilevel_roi_warp_batched(features: Sequence[Array], boxes: Array,
                                output_size: OutputSize, scales: Sequence[float],
                                sampling_ratio: int = 2, canonical_scale: float = 224,
                                canonical_level: int = 4, eps: float = 1e-6,
                                extents: Array = None, *, reduce: str = "ave",
                                max_samples: int = MAX_SAMPLES) -> Array:
  """`roi_warp` with FPN levels over a batch, as `multilevel_roi_align_batched` is `roi_align`.

  Each box reads the level `map_roi_levels` gives its (unquantized) box, of its own image.

  Args:
    features: L maps `[B, H_l, W_l, C]`, finest first.
    boxes: [B, N, 4] float32 (x1, y1, x2, y2) input pixels.
    output_size, sampling_ratio, reduce, max_samples: as in `roi_warp`.
    scales, canonical_scale, canonical_level, eps, extents: as in
      `multilevel_roi_align_batched`.

  Returns:
    [B, N, S_h, S_w, C] in the maps' dtype.

  Raises:
    ValueError: as `multilevel_roi_align_batched`.
  """
  size = _pair(output_size)
  _check_sampling(sampling_ratio, max_samples, reduce)
  features, scales = list(features), [float(s) for s in scales]
  _check_batched(features, scales, boxes, extents)
  return _pool_levels(features, boxes.astype(jnp.float32), size, scales, sampling_ratio, False,
                      canonical_scale, canonical_level, eps, extents, reduce=reduce,
                      max_samples=max_samples, quantize=True)
