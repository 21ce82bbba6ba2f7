"""RoIPool, adaptive RoIAlign, RoIAlign max and RoIWarp (the Mask R-CNN paper's Table 2c) against
torchvision (`roi_pool`, `roi_align(sampling_ratio=0)`) and float64 numpy loops of their
definitions; their multi-level batched forms; the `RoIPooler` switch."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling.poolers import RoIPooler
from maskrcnn_jax.ops.roi_align import (
    map_roi_levels,
    multilevel_roi_align_batched,
    multilevel_roi_warp_batched,
    roi_align,
    roi_warp,
)
from maskrcnn_jax.ops.roi_pool import multilevel_roi_pool_batched, roi_pool
from tests.conftest import torch_or_skip
from tests.ops.test_roi_align import random_boxes

ATOL = 1e-4


def half_boxes(scale):
  """Boxes whose corners land on x.5 after scaling (C++ rounds halves away from zero, numpy and
  jnp.round to even), negative ones included."""
  halves = np.array([[0.5, 1.5, 2.5, 4.5], [-0.5, -1.5, 2.5, 3.5], [-2.5, 0.5, 0.5, 5.5],
                     [3.5, 2.5, 3.5, 2.5], [1.5, 3.5, 6.5, 5.5]], np.float64)
  return (halves / scale).astype(np.float32)


def nchw(torch, features):
  return torch.from_numpy(np.ascontiguousarray(features.transpose(2, 0, 1)))[None]


def torch_pool(torch, fn, features, cotangent):
  """torchvision op `fn(x)` on one NHWC map -> (output NHWC, gradient NHWC) for `cotangent`."""
  x = nchw(torch, features).requires_grad_()
  out = fn(x).permute(0, 2, 3, 1)
  (out * torch.from_numpy(cotangent)).sum().backward()
  return out.detach().numpy(), x.grad[0].permute(1, 2, 0).numpy()


@functools.partial(jax.jit, static_argnames=("op", "output_size", "scale", "options"))
def value_and_grad(features, boxes, cotangent, op, output_size, scale, options):
  """(op(features, boxes) [N, S_h, S_w, C], gradient of sum(op * cotangent) w.r.t. features)."""
  fn = lambda x: op(x, boxes, output_size, scale, **dict(options))
  out, vjp = jax.vjp(fn, features)
  return out, vjp(cotangent.astype(out.dtype))[0]


@functools.partial(jax.jit, static_argnames=("op", "output_size", "scale", "options"))
def forward(features, boxes, op, output_size, scale, options):
  return op(features, boxes, output_size, scale, **dict(options))


def run(op, features, boxes, output_size, scale, cotangent=None, **options):
  """Jitted `op` -> (output, gradient of sum(output * cotangent)), or (output, None) without a
  cotangent (a smaller compile)."""
  options = tuple(sorted(options.items()))
  features, boxes = jnp.asarray(features), jnp.asarray(boxes)
  if cotangent is None:
    return np.asarray(forward(features, boxes, op, output_size, scale, options)), None
  out, grad = value_and_grad(features, boxes, jnp.asarray(cotangent), op, output_size, scale,
                             options)
  return np.asarray(out), np.asarray(grad)


# ------------------------------------------------------------------------------------------------
# RoIPool against torchvision.


@pytest.mark.reference
@pytest.mark.parametrize("seed,scale,output_size,integer", [
    (0, 0.25, 7, True), (1, 0.5, (3, 5), False)])
def test_roi_pool_matches_torchvision(seed, scale, output_size, integer):
  torch, torchvision = torch_or_skip()
  rng = np.random.default_rng(seed)
  height, width = int(rng.integers(9, 20)), int(rng.integers(12, 26))
  features = rng.standard_normal((height, width, 5))
  if integer:  # Few distinct values: many ties, which go to the first maximum.
    features = rng.integers(-2, 3, (height, width, 5))
  features = features.astype(np.float32)
  boxes = np.concatenate([random_boxes(rng, 20, height / scale, width / scale),
                          half_boxes(scale)])
  size = (output_size,) * 2 if isinstance(output_size, int) else output_size
  cotangent = rng.standard_normal((len(boxes),) + size + (5,)).astype(np.float32)
  # A window as large as the map: exact for every box, the huge ones included.
  ours, grad = run(roi_pool, features, boxes, output_size, scale, cotangent,
                   max_bin_size=max(height, width))
  theirs, their_grad = torch_pool(
      torch, lambda x: torchvision.ops.roi_pool(x, [torch.from_numpy(boxes)], output_size, scale),
      features, cotangent)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_allclose(grad, their_grad, rtol=0, atol=1e-5)
  assert np.abs(their_grad).max() > 1.0


@pytest.mark.reference
def test_roi_pool_default_window_is_exact_inside_the_map():
  torch, torchvision = torch_or_skip()
  rng = np.random.default_rng(3)
  height, width, scale = 21, 30, 0.25
  features = rng.standard_normal((height, width, 4)).astype(np.float32)
  image = np.array([width, height, width, height]) / scale
  boxes = np.clip(random_boxes(rng, 30, height / scale, width / scale), 0, image)
  boxes = boxes.astype(np.float32)
  cotangent = rng.standard_normal((len(boxes), 7, 7, 4)).astype(np.float32)
  ours, grad = run(roi_pool, features, boxes, 7, scale, cotangent)
  theirs, their_grad = torch_pool(
      torch, lambda x: torchvision.ops.roi_pool(x, [torch.from_numpy(boxes)], 7, scale),
      features, cotangent)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_allclose(grad, their_grad, rtol=0, atol=1e-5)


def test_roi_pool_beyond_the_window_subsamples_evenly():
  """A bin of L > K rows reads rows `lo + floor(k * L / K)`, k < K (and the same for columns)."""
  rng = np.random.default_rng(4)
  features = rng.standard_normal((12, 15, 3)).astype(np.float32)
  boxes = np.array([[0, 0, 14, 11], [2, 1, 9, 10], [-3, 4, 20, 6]], np.float32)
  ours, _ = run(roi_pool, features, boxes, 2, 1.0, max_bin_size=3)
  expected = np.zeros((3, 2, 2, 3))
  for n, (x1, y1, x2, y2) in enumerate(boxes):
    x0, y0 = int(round(x1)), int(round(y1))
    w, h = max(int(round(x2)) - x0 + 1, 1), max(int(round(y2)) - y0 + 1, 1)

    def pixels(p, size, start, extent):
      lo = min(max(math.floor(p * size / 2) + start, 0), extent)
      hi = min(max(math.ceil((p + 1) * size / 2) + start, 0), extent)
      length = hi - lo
      return [lo + (k * length // 3 if length > 3 else k) for k in range(min(length, 3))]

    for ph in range(2):
      for pw in range(2):
        rows, cols = pixels(ph, h, y0, 12), pixels(pw, w, x0, 15)
        expected[n, ph, pw] = features[np.ix_(rows, cols)].max(axis=(0, 1))
  np.testing.assert_array_equal(ours, expected)


def test_roi_pool_no_boxes():
  assert roi_pool(jnp.ones((5, 6, 3)), jnp.zeros((0, 4)), (7, 5)).shape == (0, 7, 5, 3)


@pytest.mark.reference
def test_roi_pool_bfloat16():
  torch, torchvision = torch_or_skip()
  rng = np.random.default_rng(5)
  features = jnp.asarray(rng.standard_normal((10, 12, 3)), jnp.bfloat16)
  boxes = random_boxes(rng, 5, 10, 12)
  out, _ = run(roi_pool, features, boxes, 3, 1.0, max_bin_size=12)  # Exact for the huge box.
  assert out.dtype == jnp.bfloat16
  theirs = torchvision.ops.roi_pool(nchw(torch, np.asarray(features, np.float32)),
                                    [torch.from_numpy(boxes)], 3, 1.0)
  # A maximum of bfloat16 values is exact.
  np.testing.assert_array_equal(np.asarray(out, np.float32), theirs.permute(0, 2, 3, 1).numpy())


# ------------------------------------------------------------------------------------------------
# Adaptive RoIAlign against torchvision.


def under_the_cap(boxes, scale, output_size, aligned, cap):
  """The boxes whose adaptive sample counts ceil(roi / S) stay under `cap` (with a margin)."""
  shift = 0.5 if aligned else 0.0
  b = boxes.astype(np.float64) * scale - shift
  roi = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
  if not aligned:
    roi = np.maximum(roi, 1.0)
  return boxes[np.all(roi / output_size < cap - 0.01, axis=1)]


@pytest.mark.reference
@pytest.mark.parametrize("aligned", [False, True])
def test_adaptive_roi_align_matches_torchvision(aligned):
  torch, torchvision = torch_or_skip()
  rng = np.random.default_rng(10 + aligned)
  height, width, scale, output_size = 26, 38, 0.5, (5, 7)
  features = rng.standard_normal((height, width, 6)).astype(np.float32)
  boxes = random_boxes(rng, 40, height / scale, width / scale)
  boxes = under_the_cap(boxes, scale, np.array(output_size[::-1]), aligned, cap=8)
  assert len(boxes) > 40  # Only the huge boxes went.
  cotangent = rng.standard_normal((len(boxes),) + output_size + (6,)).astype(np.float32)
  ours, grad = run(roi_align, features, boxes, output_size, scale, cotangent, sampling_ratio=0,
                   aligned=aligned)
  theirs, their_grad = torch_pool(
      torch, lambda x: torchvision.ops.roi_align(x, [torch.from_numpy(boxes)], output_size, scale,
                                                 0, aligned), features, cotangent)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
  np.testing.assert_allclose(grad, their_grad, rtol=0, atol=5 * ATOL)
  assert np.abs(their_grad).max() > 1.0


@pytest.mark.reference
def test_adaptive_roi_align_beyond_the_cap_samples_the_cap():
  """Boxes needing more than `max_samples` per side on both axes are sampled with the cap."""
  torch, torchvision = torch_or_skip()
  rng = np.random.default_rng(12)
  features = rng.standard_normal((20, 24, 3)).astype(np.float32)
  boxes = np.array([[-10, -5, 30, 25], [0, 0, 24, 20], [3.3, 2.1, 19.7, 17.2]], np.float32)
  ours, _ = run(roi_align, features, boxes, 3, 1.0, sampling_ratio=0, max_samples=2)
  theirs = torchvision.ops.roi_align(nchw(torch, features), [torch.from_numpy(boxes)], 3, 1.0, 2)
  np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# RoIAlign max and RoIWarp against float64 numpy loops of their definitions.


def round_half_away(v):
  return float(np.sign(v) * np.floor(np.abs(v) + 0.5))


def bilinear(features, y, x):
  """torchvision's `bilinear_interpolate`: -> (value [C], [(row, col, weight)])."""
  height, width = features.shape[:2]
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(features.shape[-1]), []
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  taps = [(y_low, x_low, (1 - ly) * (1 - lx)), (y_low, x_high, (1 - ly) * lx),
          (y_high, x_low, ly * (1 - lx)), (y_high, x_high, ly * lx)]
  return sum(w * features[r, c] for r, c, w in taps), taps


def numpy_sampled_pool(features, boxes, output_size, scale, sampling_ratio, reduce, quantize,
                       cotangent, max_samples=8):
  """RoIAlign (aligned=False) or RoIWarp (`quantize`), ave or max, in float64 loops.

  Returns (output [N, S_h, S_w, C], gradient [H, W, C] of sum(output * cotangent))."""
  f = features.astype(np.float64)
  s_h, s_w = output_size
  out = np.zeros((len(boxes), s_h, s_w, f.shape[-1]))
  grad = np.zeros_like(f)
  for n, box in enumerate(boxes):
    scaled = [float(np.float32(v) * np.float32(scale)) for v in box]
    if quantize:  # RoIPool's snapping: the box covers pixels start .. end.
      x1, y1, x2, y2 = [round_half_away(v) for v in scaled]
      w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    else:
      x1, y1, x2, y2 = scaled
      w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    bin_h, bin_w = h / s_h, w / s_w
    g_h = sampling_ratio or min(math.ceil(bin_h), max_samples)
    g_w = sampling_ratio or min(math.ceil(bin_w), max_samples)
    for ph in range(s_h):
      for pw in range(s_w):
        values, taps = [], []
        for iy in range(g_h):
          for ix in range(g_w):
            y = y1 + ph * bin_h + (iy + 0.5) * bin_h / g_h
            x = x1 + pw * bin_w + (ix + 0.5) * bin_w / g_w
            value, tap = bilinear(f, y, x)
            values.append(value)
            taps.append(tap)
        values = np.stack(values)
        ct = cotangent[n, ph, pw].astype(np.float64)
        if reduce == "ave":
          out[n, ph, pw] = values.mean(axis=0)
          for tap in taps:
            for r, c, wt in tap:
              grad[r, c] += ct * wt / len(taps)
        else:
          out[n, ph, pw] = values.max(axis=0)
          for ch, best in enumerate(np.argmax(values, axis=0)):  # The first maximum.
            for r, c, wt in taps[best]:
              grad[r, c, ch] += ct[ch] * wt
  return out, grad


@pytest.mark.parametrize("op,sampling_ratio,reduce", [
    ("align", 2, "max"), ("align", 0, "max"), ("warp", 2, "ave"), ("warp", 1, "max"),
    ("warp", 0, "ave")])
def test_sampled_variants_match_numpy(op, sampling_ratio, reduce):
  rng = np.random.default_rng(20 + sampling_ratio + 3 * (reduce == "max"))
  height, width, scale, output_size = 11, 14, 0.5, (3, 4)
  features = rng.standard_normal((height, width, 3)).astype(np.float32)
  # The two huge boxes of random_boxes left out (float64 positions far from the map move by more
  # than float32 round-off), one just larger than the map added.
  larger = np.array([[-3, -2, width / scale + 3, height / scale + 2]], np.float32)
  boxes = np.concatenate([random_boxes(rng, 6, height / scale, width / scale)[:-2],
                          half_boxes(scale), larger])
  cotangent = rng.standard_normal((len(boxes),) + output_size + (3,)).astype(np.float32)
  fn = roi_align if op == "align" else roi_warp
  ours, grad = run(fn, features, boxes, output_size, scale, cotangent,
                   sampling_ratio=sampling_ratio, reduce=reduce)
  expected, expected_grad = numpy_sampled_pool(features, boxes, output_size, scale, sampling_ratio,
                                               reduce, op == "warp", cotangent)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
  np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=ATOL)
  assert np.abs(expected_grad).max() > 0.5


# ------------------------------------------------------------------------------------------------
# Multi-level and batched forms equal the single-level form per box and image.

SCALES = (1 / 4, 1 / 8)
VARIANTS = {  # name: (single-level op, multi-level batched op, options)
    "pool": (roi_pool, multilevel_roi_pool_batched, dict(max_bin_size=6)),
    "align_max": (roi_align, multilevel_roi_align_batched, dict(reduce="max")),
    "align_adaptive": (roi_align, multilevel_roi_align_batched, dict(sampling_ratio=0)),
    "warp_ave": (roi_warp, multilevel_roi_warp_batched, dict(sampling_ratio=0)),
    "warp_max": (roi_warp, multilevel_roi_warp_batched, dict(reduce="max")),
}
# The variants with a backward pass of their own (the others share the RoIAlign core's, whose
# multi-level form is checked in test_roi_align.py): their gradients are compared too.
OWN_BACKWARD = ("pool", "align_max")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_multilevel_batched_forms_match_single_level(variant):
  single, multi, options = VARIANTS[variant]
  with_grad = variant in OWN_BACKWARD
  rng = np.random.default_rng(len(variant))
  canvas, channels = (96, 128), 3
  maps = [rng.standard_normal((2, int(canvas[0] * s), int(canvas[1] * s), channels))
          .astype(np.float32) for s in SCALES]
  side = np.exp(rng.uniform(np.log(8), np.log(250), (2, 12)))
  centre = rng.uniform(-10, [[[canvas[1] + 10]], [[canvas[0] + 10]]], (2, 2, 12))
  boxes = np.stack([centre[:, 0] - side / 2, centre[:, 1] - side / 3, centre[:, 0] + side / 2,
                    centre[:, 1] + side / 3], axis=-1).astype(np.float32)  # [2, 12, 4]
  cotangent = rng.standard_normal((2, 12, 5, 5, channels)).astype(np.float32)

  @jax.jit
  def pool(maps, boxes, cotangent):
    """The multi-level batched form, and the single-level form per level and image (vmap), with
    the cotangent of the boxes read from each level (one compile)."""
    levels = jax.vmap(lambda b: map_roi_levels(b, 2, 3))(boxes)  # [2, 12]

    def singles(maps):
      return [jax.vmap(lambda m, b: single(m, b, 5, s, **options))(m, boxes)
              for m, s in zip(maps, SCALES)]

    if not with_grad:
      return levels, multi(maps, boxes, 5, SCALES, **options), singles(maps), None, None
    out, vjp = jax.vjp(lambda m: multi(m, boxes, 5, SCALES, **options), maps)
    per_level, single_vjp = jax.vjp(singles, maps)
    per_level_ct = [jnp.where((levels == l)[..., None, None, None], cotangent, 0.0)
                    for l in range(len(SCALES))]
    return levels, out, per_level, vjp(cotangent)[0], single_vjp(per_level_ct)[0]

  levels, out, per_level, grads, single_grads = jax.tree.map(np.asarray, pool(
      [jnp.asarray(m) for m in maps], jnp.asarray(boxes), jnp.asarray(cotangent)))
  for b in range(2):
    assert set(levels[b].tolist()) == {0, 1}
  expected = np.where((levels == 0)[..., None, None, None], per_level[0], per_level[1])
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
  if with_grad:
    for grad, single_grad in zip(grads, single_grads):
      np.testing.assert_allclose(grad, single_grad, rtol=0, atol=1e-5)
      assert np.abs(single_grad).max() > 0.5


def test_roi_pool_extents_equal_pooling_the_cropped_maps():
  """Garbage past each image's valid extent is never read: as pooling the cropped maps. (The
  sampled variants share RoIAlign's handling of extents, checked in test_roi_align.py.)"""
  _, multi, options = VARIANTS["pool"]
  rng = np.random.default_rng(40)
  valid, canvas = [(40, 56), (48, 32)], (48, 64)
  maps = [rng.normal(size=(2, canvas[0] >> l, canvas[1] >> l, 3)).astype(np.float32)
          for l in range(2)]
  boxes = np.stack([np.array([[0, 0, 4 * w, 4 * h], [10, 20, 4 * w, 4 * h - 3],
                              [4 * w - 30, 4 * h - 30, 4 * w + 9, 4 * h], [5, 5, 60, 90]],
                             np.float32) for h, w in valid])
  extents = np.array([[[h >> l, w >> l] for l in range(2)] for h, w in valid], np.int32)
  pool = jax.jit(lambda m, b, e: multi(m, b, 7, SCALES, extents=e, **options))
  got = np.asarray(pool(maps, boxes, extents))
  # The second image's maps cropped to its extent (the first's are a row or column shorter).
  h, w = valid[1]
  cropped = [m[1:, :h >> l, :w >> l] for l, m in enumerate(maps)]
  expected = np.asarray(pool(cropped, boxes[1:], None))
  np.testing.assert_array_equal(got[1], expected[0])


# ------------------------------------------------------------------------------------------------
# Argument checks and the pooler.


def test_bad_arguments_are_rejected():
  features, boxes = jnp.zeros((8, 8, 2)), jnp.zeros((3, 4))
  with pytest.raises(ValueError, match="reduce"):
    roi_align(features, boxes, 7, reduce="mean")
  with pytest.raises(ValueError, match="sampling_ratio"):
    roi_warp(features, boxes, 7, sampling_ratio=-1)
  with pytest.raises(ValueError, match="max_samples"):
    roi_align(features, boxes, 7, sampling_ratio=0, max_samples=0)
  with pytest.raises(ValueError, match="max_bin_size"):
    roi_pool(features, boxes, 7, max_bin_size=0)
  with pytest.raises(ValueError, match="features"):
    roi_pool(features[None], boxes, 7)
  with pytest.raises(ValueError, match="boxes"):
    roi_pool(features, jnp.zeros((3, 5)), 7)
  with pytest.raises(ValueError, match="output_size"):
    roi_warp(features, boxes, (7, 0))
  with pytest.raises(ValueError, match="extents"):
    multilevel_roi_pool_batched([features[None]], boxes[None], 7, [1.0],
                                extents=jnp.zeros((1, 2, 2), jnp.int32))


@pytest.mark.parametrize("fields,match", [
    (dict(type="roi"), "type"), (dict(reduce="mean"), "reduce"),
    (dict(type="pool", reduce="ave"), "reduce='ave'"), (dict(sampling_ratio=-1), "sampling_ratio"),
    (dict(sampling_ratio=1.5), "sampling_ratio"), (dict(type="warp", aligned=True), "aligned"),
    (dict(max_samples=0), "max_samples"), (dict(max_bin_size=-1), "max_bin_size")])
def test_pooler_rejects_bad_fields(fields, match):
  with pytest.raises(ValueError, match=match):
    RoIPooler(**fields)


def test_pooler_defaults_are_unchanged():
  pooler = RoIPooler()
  assert (pooler.type, pooler.sampling_ratio, pooler.aligned, pooler.reduce) == (
      "align", 2, False, "")
  RoIPooler(type="pool", reduce="max")  # The type's own reduce, spelled out, is fine.


@pytest.mark.parametrize("fields,op,options", [
    (dict(type="align", reduce="max", sampling_ratio=0, max_samples=4),
     multilevel_roi_align_batched, dict(reduce="max", sampling_ratio=0, max_samples=4)),
    (dict(type="warp", sampling_ratio=1), multilevel_roi_warp_batched, dict(sampling_ratio=1)),
    (dict(type="pool", max_bin_size=5), multilevel_roi_pool_batched, dict(max_bin_size=5))])
def test_pooler_types_run_under_jit(fields, op, options):
  rng = np.random.default_rng(50)
  pooler = RoIPooler(output_size=4, levels=(2, 3), **fields)
  features = {l: jnp.asarray(rng.standard_normal((2, 64 >> l, 80 >> l, 3)), jnp.float32)
              for l in (2, 3, 4)}
  boxes = jnp.asarray(np.stack([random_boxes(rng, 3, 64, 80) for _ in range(2)]))
  padded = jnp.asarray([[64, 80], [48, 72]], jnp.int32)
  extents = np.array([[[h >> l, w >> l] for l in (2, 3)] for h, w in [(64, 80), (48, 72)]])

  @jax.jit
  def pool(features, boxes, padded):
    return pooler(features, boxes, padded), op([features[2], features[3]], boxes, 4, (1 / 4, 1 / 8),
                                               extents=extents, **options)

  out, expected = pool(features, boxes, padded)
  assert out.shape == (2, 17, 4, 4, 3)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_public_ops_take_numpy_inputs():
  """`ops.roi_pool`, `roi_align` (adaptive too) and `roi_warp` called with numpy arrays, as a user
  would: the same result as with jax arrays."""
  from maskrcnn_jax.ops import roi_align as align, roi_pool as pool, roi_warp as warp
  rng = np.random.default_rng(0)
  f = rng.random((16, 16, 4)).astype(np.float32)
  b = np.array([[1, 1, 9, 9], [0.5, 2, 15, 7.5]], np.float32)
  for fn, kw in ((pool, {}), (align, dict(sampling_ratio=0)), (align, {}), (warp, {})):
    np.testing.assert_array_equal(np.asarray(fn(f, b, 3, **kw)),
                                  np.asarray(fn(jnp.asarray(f), jnp.asarray(b), 3, **kw)))
