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

Algorithm: sort once, then a `lax.while_loop` with one iteration per *kept* box: take the first
still-alive box in score order, emit it, and kill every alive box overlapping it by more than the
threshold. The loop stops after `max_output` kept boxes or when nothing is alive, so it costs
O(kept * N) work and O(N) memory (no [N, N] IoU matrix), and asking for 100 of 5000 detections costs
100 iterations. Under `vmap` the loop runs until the longest batch member is done.
"""
import operator
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops.boxes import box_area
from maskrcnn_jax.types import Array


def nms(boxes: Array, scores: Array, iou_threshold: float, max_output: int,
        valid: Optional[Array] = None) -> Tuple[Array, Array]:
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

  Returns:
    indices: [max_output] int32 indices into `boxes` of the kept boxes, by decreasing score;
      unused slots hold 0.
    valid: [max_output] bool, True for the first k slots, k = min(max_output, number kept).

  Raises:
    ValueError: on shapes other than the above or a negative / non-integer `max_output`.
  """
  n = _check_inputs("nms", boxes, scores, valid, max_output)
  return _greedy_nms(boxes, scores, None, iou_threshold, max_output, valid, n)


def batched_nms(boxes: Array, scores: Array, classes: Array, iou_threshold: float, max_output: int,
                valid: Optional[Array] = None) -> Tuple[Array, Array]:
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
  return _greedy_nms(boxes, scores, classes, iou_threshold, max_output, valid, n)


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


def _greedy_nms(boxes, scores, classes, iou_threshold, max_output, valid, n):
  """Shared body of `nms` and `batched_nms` (classes None: class-agnostic)."""
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
  sorted_classes = None if classes is None else jnp.asarray(classes, jnp.int32)[order]

  def cond(carry):
    alive, _, count, pos = carry
    return (count < max_output) & alive[pos]

  def body(carry):
    alive, kept, count, pos = carry
    suppress = _iou(sorted_boxes[pos], sorted_boxes) > threshold  # NaN compares False.
    if sorted_classes is not None:
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
