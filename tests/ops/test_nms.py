"""`maskrcnn_jax.ops.nms`: the indices and order of `torchvision.ops.nms` / `batched_nms`."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.nms import batched_nms, nms
from tests.conftest import torch_or_skip

# Thresholds (and max_output) are static: they fix the compiled comparison and the output shape.
nms_jit = jax.jit(nms, static_argnames=("iou_threshold", "max_output"))
batched_nms_jit = jax.jit(batched_nms, static_argnames=("iou_threshold", "max_output"))

# Every test runs both forms: greedy (what "auto" picks on CPU) and tiled (what it picks on TPU and
# GPU), the latter with small tiles so that inputs span many tiles and stop early.
TEST_TILE = 64


@pytest.fixture(autouse=True, params=["greedy", "tiled"])
def method(request, monkeypatch):
  mod = __import__(__name__, fromlist=["_"])
  kw = dict(method=request.param, tile_size=TEST_TILE)
  nms_m = functools.partial(nms, **kw)
  batched_m = functools.partial(batched_nms, **kw)
  monkeypatch.setattr(mod, "nms", nms_m)
  monkeypatch.setattr(mod, "batched_nms", batched_m)
  monkeypatch.setattr(mod, "nms_jit", jax.jit(nms_m, static_argnames=("iou_threshold",
                                                                      "max_output")))
  monkeypatch.setattr(mod, "batched_nms_jit", jax.jit(batched_m, static_argnames=(
      "iou_threshold", "max_output")))
  return request.param


# ----------------------------------------------------------------------------------------------
# Inputs and references.


def clustered_boxes(rng, n, num_clusters=None, grid=None):
  """[n, 4] float32 (x1, y1, x2, y2) boxes jittered around a few centres, so they overlap heavily.

  grid: if set, coordinates are rounded to multiples of it (exact IoU ties at simple fractions).
  """
  k = num_clusters or max(1, n // 25)
  centres = rng.uniform(0, 600, (k, 2))
  sizes = rng.uniform(10, 150, (k, 2))
  which = rng.integers(0, k, n)
  ctr = centres[which] + rng.normal(0, 0.15, (n, 2)) * sizes[which]
  wh = sizes[which] * rng.uniform(0.6, 1.4, (n, 2))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1)
  if grid is not None:
    boxes = np.round(boxes / grid) * grid
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + grid)
  return boxes.astype(np.float32)


def distinct_scores(rng, n):
  """[n] float32 scores with no ties (random floats at n = 5000 collide about once)."""
  return (rng.permutation(n) / max(n, 1)).astype(np.float32)


def torch_nms(boxes, scores, iou_threshold, valid=None):
  """torchvision.ops.nms on the valid boxes, as indices into the full input."""
  torch, torchvision = torch_or_skip()
  idx = np.arange(len(boxes)) if valid is None else np.flatnonzero(valid)
  keep = torchvision.ops.nms(torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]),
                             iou_threshold).numpy()
  return idx[keep]


def torch_batched_nms(boxes, scores, classes, iou_threshold, valid=None):
  """torchvision.ops.batched_nms on the valid boxes, as indices into the full input."""
  torch, torchvision = torch_or_skip()
  idx = np.arange(len(boxes)) if valid is None else np.flatnonzero(valid)
  keep = torchvision.ops.batched_nms(torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]),
                                     torch.from_numpy(classes[idx].astype(np.int64)),
                                     iou_threshold).numpy()
  return idx[keep]


def torch_per_class_nms(boxes, scores, classes, iou_threshold):
  """torchvision.ops.nms run class by class (torchvision's `_batched_nms_vanilla`), merged by score.

  Ties in score are ordered by index, the order `batched_nms` documents.
  """
  keep = np.concatenate([np.flatnonzero(classes == c)[torch_nms(boxes[classes == c],
                                                                 scores[classes == c],
                                                                 iou_threshold)]
                         for c in np.unique(classes)])
  return keep[np.lexsort((keep, -scores[keep]))]


def assert_same_keep(result, expected, max_output):
  """`result` = (indices, valid) holds the first max_output of `expected`, then (0, False)."""
  indices, valid = (np.asarray(a) for a in result)
  assert indices.shape == (max_output,) and indices.dtype == np.int32
  assert valid.shape == (max_output,) and valid.dtype == np.bool_
  k = min(len(expected), max_output)
  np.testing.assert_array_equal(valid, np.arange(max_output) < k)
  np.testing.assert_array_equal(indices[:k], np.asarray(expected)[:k])
  np.testing.assert_array_equal(indices[k:], 0)


# ----------------------------------------------------------------------------------------------
# Hand-checked cases (no torch needed).


def test_keeps_higher_score_and_is_strict_at_threshold():
  boxes = np.array([[0, 0, 10, 10],   # IoU with box 1: 50 / 100 = 0.5 exactly
                    [0, 0, 10, 5],
                    [20, 20, 30, 30],  # disjoint
                    [0, 0, 10, 10]], np.float32)  # identical to box 0
  scores = np.array([0.5, 0.9, 0.1, 0.5], np.float32)
  # Score order 1, 0, 3 (tie with 0: lower index first), 2. At 0.5 box 1 does not remove box 0
  # (IoU == threshold is kept), box 0 removes its duplicate 3.
  assert_same_keep(nms_jit(boxes, scores, iou_threshold=0.5, max_output=6), [1, 0, 2], 6)
  assert_same_keep(nms_jit(boxes, scores, iou_threshold=0.49, max_output=6), [1, 2], 6)
  assert_same_keep(nms_jit(boxes, scores, iou_threshold=0.5, max_output=2), [1, 0], 2)
  # Invalid boxes neither survive nor suppress: without box 0, box 3 survives.
  valid = np.array([False, True, True, True])
  assert_same_keep(nms_jit(boxes, scores, iou_threshold=0.5, max_output=4, valid=valid),
                   [1, 3, 2], 4)
  # Class-aware: the duplicate of another class survives.
  classes = np.array([0, 0, 0, 1], np.int32)
  assert_same_keep(batched_nms_jit(boxes, scores, classes, iou_threshold=0.5, max_output=4),
                   [1, 0, 3, 2], 4)


def test_empty_input_and_zero_max_output():
  boxes, scores = np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
  assert_same_keep(nms(boxes, scores, 0.5, 3), [], 3)
  assert_same_keep(batched_nms(boxes, scores, np.zeros((0,), np.int32), 0.5, 3), [], 3)
  boxes, scores = np.ones((4, 4), np.float32), np.ones((4,), np.float32)
  assert_same_keep(nms(boxes, scores, 0.5, 0), [], 0)


def test_all_invalid_keeps_nothing():
  boxes = clustered_boxes(np.random.default_rng(0), 50)
  scores = np.ones(50, np.float32)
  assert_same_keep(nms_jit(boxes, scores, iou_threshold=0.5, max_output=10,
                           valid=np.zeros(50, bool)), [], 10)


@pytest.mark.parametrize("bad, match", [
    (dict(boxes=np.zeros((10, 5))), r"boxes must have shape \[N, 4\]"),
    (dict(boxes=np.zeros((10,))), r"boxes must have shape \[N, 4\]"),
    (dict(boxes=np.zeros((2, 10, 4)), scores=np.zeros((2, 10))), "jax.vmap"),
    (dict(scores=np.zeros((11,))), r"scores must have shape \[N\] = \[10\]"),
    (dict(scores=np.zeros((10, 1))), r"scores must have shape \[N\] = \[10\]"),
    (dict(valid=np.ones((9,), bool)), r"valid must be None or have shape \[N\] = \[10\]"),
    (dict(classes=np.zeros((9,), np.int32)), r"classes must have shape \[N\] = \[10\]"),
    (dict(max_output=-1), "max_output must be >= 0"),
    (dict(max_output=2.5), "max_output must be a static Python int"),
])
def test_wrong_arguments_raise(bad, match):
  args = dict(boxes=np.zeros((10, 4), np.float32), scores=np.zeros((10,), np.float32),
              classes=np.zeros((10,), np.int32), iou_threshold=0.5, max_output=5, valid=None)
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    batched_nms(**args)
  if "classes" not in bad:
    del args["classes"]
    with pytest.raises(ValueError, match=match):
      nms(**args)


def test_traced_max_output_raises():
  with pytest.raises(ValueError, match="static_argnames"):
    jax.jit(nms)(np.zeros((3, 4), np.float32), np.zeros(3, np.float32), 0.5, 2)


def test_jit_does_not_retrace_for_same_shapes():
  rng = np.random.default_rng(1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(boxes, scores, classes, valid):
    return nms(boxes, scores, 0.7, 100, valid), batched_nms(boxes, scores, classes, 0.5, 100, valid)

  for _ in range(3):
    boxes = clustered_boxes(rng, 300)
    run(boxes, rng.random(300).astype(np.float32), rng.integers(0, 5, 300).astype(np.int32),
        rng.random(300) < 0.9)
  chex.clear_trace_counter()


# ----------------------------------------------------------------------------------------------
# Side by side with torchvision.


@pytest.mark.reference
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("n", [1, 10, 200, 2000])
def test_nms_matches_torchvision(n, iou_threshold):
  rng = np.random.default_rng(n)
  for _ in range(3):  # same shapes: one compilation for the three seeds
    boxes, scores = clustered_boxes(rng, n), rng.random(n).astype(np.float32)
    expected = torch_nms(boxes, scores, iou_threshold)
    assert_same_keep(nms_jit(boxes, scores, iou_threshold=iou_threshold, max_output=n), expected, n)


@pytest.mark.reference
def test_nms_max_output_smaller_and_larger_than_kept():
  rng = np.random.default_rng(2)
  boxes, scores = clustered_boxes(rng, 300), rng.random(300).astype(np.float32)
  expected = torch_nms(boxes, scores, 0.5)
  assert 20 < len(expected) < 200
  for max_output in (1, 7, len(expected) - 1, len(expected), len(expected) + 1, 500):
    assert_same_keep(nms_jit(boxes, scores, iou_threshold=0.5, max_output=max_output), expected,
                     max_output)


@pytest.mark.reference
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7, 1 / 3, float(np.float32(0.3))])
def test_nms_exact_iou_ties_at_threshold(iou_threshold):
  # Integer coordinates make many IoUs exactly 0.3, 1/3, 0.5, ... in float32. torchvision compares
  # the float32 IoU with a double threshold: float32(0.3) > 0.3 is suppressed at 0.3 but not at
  # float(float32(0.3)).
  rng = np.random.default_rng(3)
  xy = rng.integers(0, 6, (400, 2))
  wh = rng.integers(1, 6, (400, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  scores = rng.random(400).astype(np.float32)
  expected = torch_nms(boxes, scores, iou_threshold)
  assert_same_keep(nms_jit(boxes, scores, iou_threshold=iou_threshold, max_output=400),
                   expected, 400)


@pytest.mark.reference
def test_nms_traced_threshold():
  rng = np.random.default_rng(4)
  boxes, scores = clustered_boxes(rng, 200), rng.random(200).astype(np.float32)
  run = jax.jit(functools.partial(nms, max_output=200))
  assert_same_keep(run(boxes, scores, jnp.float32(0.5)), torch_nms(boxes, scores, 0.5), 200)


@pytest.mark.reference
def test_nms_identical_boxes_and_tied_scores():
  rng = np.random.default_rng(5)
  boxes = np.repeat(clustered_boxes(rng, 20), 10, axis=0)  # 20 boxes, 10 copies each
  scores = rng.integers(0, 4, 200).astype(np.float32) / 4  # heavy ties
  for iou_threshold in (0.3, 0.7, 0.99):
    expected = torch_nms(boxes, scores, iou_threshold)
    assert_same_keep(nms_jit(boxes, scores, iou_threshold=iou_threshold, max_output=200),
                     expected, 200)
  same = np.tile(np.float32([[1, 2, 30, 40]]), (50, 1))
  assert_same_keep(nms_jit(same, np.ones(50, np.float32), iou_threshold=0.5, max_output=5), [0], 5)


@pytest.mark.reference
@pytest.mark.parametrize("iou_threshold", [-1.0, 0.0, 0.5])
def test_nms_zero_area_boxes(iou_threshold):
  # Empty boxes: IoU 0 with real boxes and 0 / 0 = NaN (never suppresses) with each other.
  rng = np.random.default_rng(6)
  boxes = clustered_boxes(rng, 100, grid=1.0)
  boxes[::3, 2] = boxes[::3, 0]  # zero width
  boxes[1::5, 3] = boxes[1::5, 1]  # zero height
  boxes[50:60] = boxes[50]  # identical empty boxes (box 50 has zero width)
  scores = rng.integers(0, 10, 100).astype(np.float32)
  expected = torch_nms(boxes, scores, iou_threshold)
  assert_same_keep(nms_jit(boxes, scores, iou_threshold=iou_threshold, max_output=100),
                   expected, 100)


@pytest.mark.reference
@pytest.mark.parametrize("n", [10, 200, 2000])
def test_nms_invalid_boxes(n):
  rng = np.random.default_rng(7)
  for fraction in (0.2, 0.7):
    boxes, scores = clustered_boxes(rng, n), rng.random(n).astype(np.float32)
    valid = rng.random(n) >= fraction
    expected = torch_nms(boxes, scores, 0.5, valid)
    # Padding may hold anything: it must not move the valid boxes' result.
    boxes[~valid] = np.nan
    scores[~valid] = np.where(rng.random((~valid).sum()) < 0.5, np.inf, np.nan)
    assert_same_keep(nms_jit(boxes, scores, iou_threshold=0.5, max_output=n, valid=valid),
                     expected, n)


@pytest.mark.reference
def test_nms_vmap_over_levels():
  # The RPN's use: 5 pyramid levels of 2000 boxes each, with per-level padding.
  rng = np.random.default_rng(8)
  boxes = np.stack([clustered_boxes(rng, 2000) for _ in range(5)])
  scores = rng.random((5, 2000)).astype(np.float32)
  valid = rng.random((5, 2000)) < np.array([1.0, 0.9, 0.5, 0.1, 0.0])[:, None]
  run = jax.jit(jax.vmap(functools.partial(nms, iou_threshold=0.7, max_output=1000)))
  indices, keep = run(boxes, scores, valid=valid)
  assert indices.shape == keep.shape == (5, 1000)
  for level in range(5):
    expected = torch_nms(boxes[level], scores[level], 0.7, valid[level])
    assert_same_keep((indices[level], keep[level]), expected, 1000)


@pytest.mark.reference
@pytest.mark.parametrize("n, num_classes", [(10, 3), (200, 5), (1000, 80)])
def test_batched_nms_matches_torchvision_coordinate_trick(n, num_classes):
  # N <= 1000: torchvision offsets each class's boxes. On integer coordinates the offset is exact.
  rng = np.random.default_rng(9)
  for iou_threshold in (0.3, 0.7):
    boxes = clustered_boxes(rng, n, num_clusters=max(1, n // 50), grid=1.0)
    scores = distinct_scores(rng, n)
    classes = rng.integers(0, num_classes, n).astype(np.int32)
    expected = torch_batched_nms(boxes, scores, classes, iou_threshold)
    assert_same_keep(batched_nms_jit(boxes, scores, classes, iou_threshold=iou_threshold,
                                     max_output=n), expected, n)


@pytest.mark.reference
@pytest.mark.parametrize("n", [200, 1000])
def test_batched_nms_matches_torchvision_per_class(n):
  # Real-valued coordinates and tied scores, against torchvision's per-class loop.
  rng = np.random.default_rng(10)
  boxes = clustered_boxes(rng, n, num_clusters=5)
  scores = rng.integers(0, 20, n).astype(np.float32) / 20
  classes = rng.integers(0, 30, n).astype(np.int32)
  valid = rng.random(n) < 0.8
  expected = torch_per_class_nms(boxes[valid], scores[valid], classes[valid], 0.5)
  expected = np.flatnonzero(valid)[expected]
  assert_same_keep(batched_nms_jit(boxes, scores, classes, iou_threshold=0.5, max_output=n,
                                   valid=valid), expected, n)


@pytest.mark.reference
def test_batched_nms_many_boxes_vanilla_path():
  # The detector's use: ~5000 candidates over 90 classes, top 100. torchvision runs its per-class
  # loop here (N > 1000 on CPU).
  rng = np.random.default_rng(11)
  n = 5000
  boxes = clustered_boxes(rng, n, num_clusters=40)
  scores = distinct_scores(rng, n)
  classes = rng.integers(1, 91, n).astype(np.int32)
  valid = rng.random(n) < 0.95
  expected = torch_batched_nms(boxes, scores, classes, 0.5, valid)
  assert len(expected) > 1000
  assert_same_keep(batched_nms_jit(boxes, scores, classes, iou_threshold=0.5, max_output=100,
                                   valid=valid), expected, 100)
  assert_same_keep(batched_nms_jit(boxes, scores, classes, iou_threshold=0.5, max_output=n,
                                   valid=valid), expected, n)


@pytest.mark.reference
def test_batched_nms_vmap():
  rng = np.random.default_rng(12)
  boxes = np.stack([clustered_boxes(rng, 300, grid=1.0) for _ in range(3)])
  scores = np.stack([distinct_scores(rng, 300) for _ in range(3)])
  classes = rng.integers(0, 10, (3, 300)).astype(np.int32)
  run = jax.jit(jax.vmap(functools.partial(batched_nms, iou_threshold=0.5, max_output=50)))
  indices, keep = run(boxes, scores, classes)
  for b in range(3):
    expected = torch_batched_nms(boxes[b], scores[b], classes[b], 0.5)
    assert_same_keep((indices[b], keep[b]), expected, 50)


# ----------------------------------------------------------------------------------------------
# The tiled form: adversarial inputs (what each platform's program holds: test_nms_platforms.py).


@pytest.mark.reference
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_chains_across_tiles(iou_threshold):
  """A chain of boxes, each overlapping the next above the threshold and the one after below it,
  scores falling along the chain: greedy keeps every other box, and the tiled form must carry the
  alternation through each tile (as many fixed-point rounds as the tile is long) and across tile
  boundaries; then the same chain with scores rising, shuffled."""
  step = {0.3: 10.0, 0.5: 6.0, 0.7: 3.0}[iou_threshold]  # IoU(next) > t >= IoU(next but one)
  n = 300
  x = np.arange(n, dtype=np.float32) * step
  boxes = np.stack([x, np.zeros(n), x + 20, np.full(n, 20.0)], 1).astype(np.float32)
  for scores in (np.linspace(1, 0, n), np.linspace(0, 1, n)):
    scores = scores.astype(np.float32)
    expected = torch_nms(boxes, scores, iou_threshold)
    assert 0.3 * n < len(expected) < 0.7 * n
    assert_same_keep(nms_jit(boxes, scores, iou_threshold=iou_threshold, max_output=n),
                     expected, n)
    perm = np.random.default_rng(0).permutation(n)
    expected = torch_nms(boxes[perm], scores[perm], iou_threshold)
    assert_same_keep(nms_jit(boxes[perm], scores[perm], iou_threshold=iou_threshold,
                             max_output=n), expected, n)


def test_unknown_method_raises():
  with pytest.raises(ValueError, match="method must be one of"):
    nms(np.zeros((3, 4), np.float32), np.zeros(3, np.float32), 0.5, 3, method="fast")
