"""Greedy non-maximum suppression with static shapes, identical to torchvision's CPU kernel.

`nms` keeps exactly the indices `torchvision.ops.nms` keeps, in the same order, and `batched_nms`
those of `torchvision.ops.batched_nms` (see its note on torchvision's coordinate trick). Both return
a fixed number of slots, `(indices [max_output] int32, valid [max_output] bool)`, so they run inside
`jit` and under `vmap` (the RPN maps `nms` over pyramid levels).

What "identical" takes, read off torchvision's `nms_kernel_impl` (csrc/ops/cpu/nms_kernel.cpp):
  * candidates are visited in `scores.sort(stable=True, descending=True)` order, so equal scores
    keep their input order; here `argsort(-scores, stable=True)` (jnp sorts -0.0 == 0.0, too);
  * area = (x2 - x1) * (y2 - y1) with no +1; IoU = inter / (area_i + area_j - inter) in float32,
    evaluated in that order, so two empty boxes give 0 / 0 = NaN and never suppress each other;
  * box j is suppressed when IoU > iou_threshold strictly, the float32 IoU being compared with the
    threshold as a C++ double: IoU == float32(0.3) = 0.30000001 is suppressed at 0.3. A concrete
    threshold is therefore rounded *down* to float32 on the host, which makes the float32 comparison
    give the double one's answer; a traced threshold is compared in float32.

Two algorithms keep the same boxes; `method="auto"` (the default) picks one per platform inside the
program (`lax.platform_dependent`, so a program lowered for TPU or GPU from a CPU host gets the
accelerator form):
  * "greedy" (CPU): sort once, then a `lax.while_loop` with one iteration per *kept* box: take the
    first still-alive box in score order, emit it, and kill every alive box overlapping it by more
    than the threshold. It stops after `max_output` kept boxes or when nothing is alive: O(kept * N)
    work, O(N) memory, the fastest form on a CPU. On an accelerator each iteration is a few small
    kernels, up to 2000 of them in sequence per training step.
  * "tiled" (TPU, GPU; MLPerf's and TF Model Garden's form): the sorted boxes in tiles of
    `tile_size`; tile by tile, the boxes any kept box of the earlier tiles overlaps are dropped
    ([T, T] IoU blocks, one per earlier tile), then the tile suppresses within itself by iterating
    `keep_j = cand_j and not any(keep_i and IoU_ij > t, i < j)` to its fixed point, which is the
    greedy answer (after k rounds the first k boxes are settled; it usually takes a handful). The
    loops run over tiles and rounds, never over kept boxes; it stops after the tile in which
    `max_output` boxes are kept. O(N^2) IoUs in [T, T] blocks (matrix-unit shaped). Unlike TF's and
    MLPerf's `_self_suppression` (which hard-code 0.5), the threshold and the strict `>` are the
    caller's at every step.
Both evaluate each IoU with the same float32 expression in the same order: they agree bit for bit.
"""
import functools
import operator
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops.boxes import box_area
from maskrcnn_jax.types import Array

METHODS = ("auto", "greedy", "tiled")
TILE_SIZE = 512
"""The tiled form's default tile (MLPerf's TPU Mask R-CNN uses 512)."""


def nms(boxes: Array, scores: Array, iou_threshold: float, max_output: int,
        valid: Optional[Array] = None, method: str = "auto",
        tile_size: int = TILE_SIZE) -> Tuple[Array, Array]:
  """Greedy NMS of one image's boxes, the indices `torchvision.ops.nms` keeps, in its order.

  Args:
    boxes: [N, 4] float32 (x1, y1, x2, y2) pixels. Degenerate boxes are allowed; a box of zero area
      has IoU 0 with boxes of positive area and NaN (no suppression) with other empty boxes, as in
      torchvision.
    scores: [N] float32, finite. Ties are broken by input order (lower index first), as
      torchvision's stable sort breaks them.
    iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box is > this
      (strictly). A Python/numpy number reproduces torchvision's double comparison exactly; a
      traced scalar is compared in float32.
    max_output: static int >= 0, the number of output slots; greedy NMS stops after this many kept
      boxes (the result is the first `max_output` of torchvision's).
    valid: [N] bool or None (all valid). Invalid boxes are never kept and never suppress others, so
      the result equals torchvision's on `boxes[valid]`, mapped back to indices of the full input.
      Their coordinates and scores may be anything, NaN included.
    method: "auto" (greedy on CPU, tiled elsewhere, chosen when the program is lowered), "greedy"
      or "tiled"; all keep the same indices.
    tile_size: static int > 0, the tile of the tiled form.

  Returns:
    indices: [max_output] int32 indices into `boxes` of the kept boxes, by decreasing score;
      unused slots hold 0.
    valid: [max_output] bool, True for the first k slots, k = min(max_output, number kept).

  Raises:
    ValueError: on shapes other than the above, a negative / non-integer `max_output` or an
      unknown `method`.
  """
  n = _check_inputs("nms", boxes, scores, valid, max_output)
  return _nms(boxes, scores, None, iou_threshold, max_output, valid, n, method, tile_size)


def batched_nms(boxes: Array, scores: Array, classes: Array, iou_threshold: float, max_output: int,
                valid: Optional[Array] = None, method: str = "auto",
                tile_size: int = TILE_SIZE) -> Tuple[Array, Array]:
  """Class-aware greedy NMS: a box only suppresses boxes of its own class.

  Keeps the indices `torchvision.ops.batched_nms` keeps, in decreasing score order (ties by input
  index). It is exactly torchvision's per-class loop (`_batched_nms_vanilla`, taken on CPU when
  N > 1000) at any N. For N <= 1000 torchvision instead shifts each class's boxes by
  `class * (max_coordinate + 1)` and runs plain NMS; the shift rounds non-integer coordinates, which
  can move an IoU lying within a few float32 ulps of the threshold across it. On integer (or coarse
  binary-fraction) coordinates the two paths agree bit for bit; on others a disagreement needs such
  a near-tie and is torchvision's rounding, not a different rule.

  Args:
    boxes: [N, 4] float32 (x1, y1, x2, y2) pixels.
    scores: [N] float32, finite.
    classes: [N] int32 class of each box (any integers; only equality matters).
    iou_threshold: as in `nms`.
    max_output: static int >= 0, the number of output slots.
    valid: [N] bool or None (all valid). Invalid boxes are never kept and never suppress others.
    method, tile_size: as in `nms`.

  Returns:
    indices: [max_output] int32 indices into `boxes` of the kept boxes, by decreasing score;
      unused slots hold 0.
    valid: [max_output] bool, True for the first min(max_output, number kept) slots.

  Raises:
    ValueError: on shapes other than the above or a negative / non-integer `max_output`.
  """
  n = _check_inputs("batched_nms", boxes, scores, valid, max_output)
  if jnp.ndim(classes) != 1 or jnp.shape(classes)[0] != n:
    raise ValueError(f"batched_nms: classes must have shape [N] = [{n}] to match boxes "
                     f"{jnp.shape(boxes)}; got {jnp.shape(classes)}.")
  return _nms(boxes, scores, classes, iou_threshold, max_output, valid, n, method, tile_size)


def _check_inputs(name, boxes, scores, valid, max_output) -> int:
  """Validates the shared arguments at trace time and returns N."""
  if jnp.ndim(boxes) != 2 or jnp.shape(boxes)[1] != 4:
    raise ValueError(f"{name}: boxes must have shape [N, 4] (x1, y1, x2, y2); got "
                     f"{jnp.shape(boxes)}. Use jax.vmap for a batch.")
  n = jnp.shape(boxes)[0]
  if jnp.ndim(scores) != 1 or jnp.shape(scores)[0] != n:
    raise ValueError(f"{name}: scores must have shape [N] = [{n}] to match boxes "
                     f"{jnp.shape(boxes)}; got {jnp.shape(scores)}.")
  if valid is not None and (jnp.ndim(valid) != 1 or jnp.shape(valid)[0] != n):
    raise ValueError(f"{name}: valid must be None or have shape [N] = [{n}] to match boxes "
                     f"{jnp.shape(boxes)}; got {jnp.shape(valid)}.")
  try:
    k = operator.index(max_output)
  except TypeError:
    raise ValueError(f"{name}: max_output must be a static Python int; got {max_output!r}. "
                     "Mark it static under jit (static_argnames).") from None
  if k < 0:
    raise ValueError(f"{name}: max_output must be >= 0; got {k}.")
  return n


def _float32_threshold(iou_threshold) -> Array:
  """The float32 `t32` with `iou > t32  <=>  iou > double(iou_threshold)` for every float32 iou.

  torchvision compares its float32 IoU with a double threshold. For a concrete threshold the largest
  float32 not above it gives the same answer (no float32 lies strictly between the two); e.g. 0.3
  rounds to 0.30000001 > 0.3, so it must become the float32 just below. Traced thresholds stay
  float32.
  """
  try:
    t = float(iou_threshold)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return jnp.asarray(iou_threshold, jnp.float32)
  t32 = np.float32(t)
  if float(t32) > t:
    t32 = np.nextafter(t32, np.float32(-np.inf))
  return jnp.float32(t32)


def _iou(box: Array, boxes: Array) -> Array:
  """IoU of `box` [..., 4] with `boxes` [..., 4] (broadcast), bit for bit as torchvision's kernel.

  Unlike `boxes.pairwise_iou` (0 for two empty boxes) this keeps 0 / 0 = NaN, as the kernel does, so
  that even a negative threshold never lets two empty boxes suppress each other.
  """
  lo = jnp.maximum(box[..., :2], boxes[..., :2])
  hi = jnp.minimum(box[..., 2:], boxes[..., 2:])
  w = jnp.maximum(0.0, hi[..., 0] - lo[..., 0])
  h = jnp.maximum(0.0, hi[..., 1] - lo[..., 1])
  inter = w * h
  return inter / (box_area(box) + box_area(boxes) - inter)


def _nms(boxes, scores, classes, iou_threshold, max_output, valid, n, method, tile_size):
  """Shared body of `nms` and `batched_nms` (classes None: class-agnostic)."""
  if method not in METHODS:
    raise ValueError(f"nms: method must be one of {METHODS}; got {method!r}.")
  if operator.index(tile_size) <= 0:
    raise ValueError(f"nms: tile_size must be a positive int; got {tile_size!r}.")
  max_output = operator.index(max_output)
  if n == 0 or max_output == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  threshold = _float32_threshold(iou_threshold)

  # Everything below lives in score order: position p holds input index order[p].
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
  sorted_boxes = boxes[order]
  alive = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)[order]
  sorted_classes = (jnp.zeros((n,), jnp.int32) if classes is None
                    else jnp.asarray(classes, jnp.int32)[order])
  greedy = functools.partial(_greedy, max_output=max_output)
  tiled = functools.partial(_tiled, max_output=max_output, tile_size=tile_size)
  args = (order, sorted_boxes, sorted_classes, alive, threshold)
  if method == "greedy":
    return greedy(*args)
  if method == "tiled":
    return tiled(*args)
  return jax.lax.platform_dependent(*args, cpu=greedy, default=tiled)


def _greedy(order, sorted_boxes, sorted_classes, alive, threshold, max_output):
  """Greedy NMS in score order: one while-loop iteration per kept box."""

  def cond(carry):
    alive, _, count, pos = carry
    return (count < max_output) & alive[pos]

  def body(carry):
    alive, kept, count, pos = carry
    suppress = _iou(sorted_boxes[pos], sorted_boxes) > threshold  # NaN compares False.
    suppress &= sorted_classes == sorted_classes[pos]
    alive = alive & ~suppress
    alive = alive.at[pos].set(False)
    kept = kept.at[count].set(order[pos])
    # The first alive position: boxes before `pos` are already kept or dead, so this is the next box
    # greedy NMS keeps (argmax of all-False is 0, which `cond` then sees as dead).
    return alive, kept, count + 1, jnp.argmax(alive).astype(jnp.int32)

  init = (alive, jnp.zeros((max_output,), jnp.int32), jnp.int32(0),
          jnp.argmax(alive).astype(jnp.int32))
  _, kept, count, _ = jax.lax.while_loop(cond, body, init)
  return kept, jnp.arange(max_output) < count


def _tiled(order, sorted_boxes, sorted_classes, alive, threshold, max_output, tile_size):
  """Tiled NMS in score order (see the module docstring): loops over tiles and fixed-point
  rounds, [T, T] IoU blocks, no scatter; the same kept set as `_greedy`."""
  n = sorted_boxes.shape[0]
  t = min(operator.index(tile_size), n)
  num_tiles = -(-n // t)
  pad = num_tiles * t - n
  boxes = jnp.pad(sorted_boxes, ((0, pad), (0, 0))).reshape(num_tiles, t, 4)
  classes = jnp.pad(sorted_classes, (0, pad)).reshape(num_tiles, t)
  cand0 = jnp.pad(alive, (0, pad)).reshape(num_tiles, t)
  earlier = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]  # [i, j]: i before j in a tile

  def overlaps(bi, ci, bj, cj):
    """[T, T] bool: box i (of bi) would suppress box j (of bj)."""
    iou = _iou(bi[:, None, :], bj[None, :, :])  # NaN compares False.
    return (iou > threshold) & (ci[:, None] == cj[None, :])

  def tile_cond(carry):
    tile, _, count = carry
    return (tile < num_tiles) & (count < max_output)

  def tile_body(carry):
    tile, keep, count = carry
    bj, cj = boxes[tile], classes[tile]

    def by_earlier_tile(s, cand):
      return cand & ~jnp.any(overlaps(boxes[s], classes[s], bj, cj) & keep[s][:, None], axis=0)

    cand = jax.lax.fori_loop(0, tile, by_earlier_tile, cand0[tile])
    within = overlaps(bj, cj, bj, cj) & earlier

    def round_cond(c):
      return c[1]

    def round_body(c):
      x, _ = c
      new = cand & ~jnp.any(within & x[:, None], axis=0)
      return new, jnp.any(new != x)

    x, _ = jax.lax.while_loop(round_cond, round_body, (cand, jnp.bool_(True)))
    # A select, not dynamic_update_slice: under vmap (the RPN's levels) the tile counter is
    # batched and an update at a batched index would become a scatter.
    keep = jnp.where((jnp.arange(num_tiles) == tile)[:, None], x[None, :], keep)
    return tile + 1, keep, count + jnp.sum(x, dtype=jnp.int32)

  _, keep, _ = jax.lax.while_loop(
      tile_cond, tile_body, (jnp.int32(0), jnp.zeros((num_tiles, t), bool), jnp.int32(0)))
  keep = keep.reshape(-1)
  m = num_tiles * t
  k = min(max_output, m)
  # The first k kept positions in score order: top_k of (m - position) over kept ones.
  rank, pos = jax.lax.top_k(jnp.where(keep, m - jnp.arange(m, dtype=jnp.int32), 0), k)
  ok = rank > 0
  kept = jnp.where(ok, order[jnp.minimum(pos, n - 1)], 0)
  if k < max_output:
    kept = jnp.pad(kept, (0, max_output - k))
    ok = jnp.pad(ok, (0, max_output - k))
  return kept.astype(jnp.int32), ok
