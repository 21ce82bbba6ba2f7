"""RoIAlign against torchvision: roi_align, MultiScaleRoIAlign, LevelMapper, gradients, bfloat16."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.roi_align import (
    map_roi_levels,
    multilevel_roi_align,
    multilevel_roi_align_batched,
    roi_align,
    roi_align_batched,
)
from tests.conftest import torch_or_skip

ATOL = 1e-4


def random_boxes(rng, n, image_h, image_w):
  """[n + 14, 4] float32 boxes in image pixels: random ones plus edge cases.

  Random boxes lie mostly inside the image, some partly outside; the edge cases touch the borders,
  lie fully outside (beyond and within the -1 pixel margin), are sub-pixel, zero-width, zero-size,
  inverted, or far larger than the image.
  """
  size = rng.uniform(0.0, 0.8, (n, 2)) * [image_w, image_h]
  start = rng.uniform(-0.2, 1.0, (n, 2)) * [image_w, image_h] - size / 2
  boxes = np.concatenate([start, start + size], axis=1)
  h, w = image_h, image_w
  edge = [
      [0, 0, w, h],  # The whole image: touches all four borders.
      [0, 0, w / 3, h / 5],  # Top-left corner.
      [w * 0.6, h * 0.5, w, h],  # Bottom-right corner.
      [-w / 2, h / 3, w / 4, h * 1.4],  # Partly outside on the left and bottom.
      [w + 50, h + 50, w + 90, h + 70],  # Fully outside, bottom-right.
      [-80, -60, -40, -20],  # Fully outside, top-left.
      [-0.5, -0.5, -0.1, -0.2],  # Outside but within the kernel's -1 margin (at scale 1).
      [w / 2, h / 2, w / 2 + 0.3, h / 2 + 0.2],  # Sub-pixel.
      [w / 3, h / 4, w / 3, h / 2],  # Zero width.
      [w / 5, h / 5, w / 5, h / 5],  # A point.
      [w - 1e-3, h - 1e-3, w, h],  # A speck in the last pixel.
      [w / 2, h / 2, w / 4, h / 3],  # Inverted (x2 < x1, y2 < y1).
      [-10 * w, -10 * h, 20 * w, 20 * h],  # Huge.
      [-w, 0, 2 * w, h],  # Wider than the image.
  ]
  return np.concatenate([boxes, edge], axis=0).astype(np.float32)


def torch_roi_align(torch, torchvision, features, boxes, output_size, scale, sampling_ratio,
                    aligned, cotangent=None):
  """torchvision on one NHWC map -> (output NHWC, gradient w.r.t. features NHWC or None)."""
  x = torch.from_numpy(np.ascontiguousarray(features.transpose(2, 0, 1)))[None]
  x.requires_grad_(cotangent is not None)
  out = torchvision.ops.roi_align(x, [torch.from_numpy(boxes)], output_size, scale, sampling_ratio,
                                  aligned)
  out_nhwc = out.permute(0, 2, 3, 1)
  if cotangent is None:
    return out_nhwc.detach().numpy(), None
  (out_nhwc * torch.from_numpy(cotangent)).sum().backward()
  return out_nhwc.detach().numpy(), x.grad[0].permute(1, 2, 0).numpy()


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def jitted_roi_align(features, boxes, output_size, scale=1.0, sampling_ratio=2, aligned=False):
  return roi_align(features, boxes, output_size, scale, sampling_ratio, aligned)


@functools.partial(jax.jit, static_argnums=(2, 3))
def jitted_multilevel(maps, boxes, output_size, scales):
  return multilevel_roi_align(maps, boxes, output_size, scales)


@pytest.mark.reference
@pytest.mark.parametrize("output_size", [7, 14])
@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_torchvision(aligned, sampling_ratio, scale, output_size):
  torch, torchvision = torch_or_skip()
  seed = 100 * sampling_ratio + 10 * output_size + int(aligned) + int(4 * scale)
  rng = np.random.default_rng(seed)
  height, width = rng.integers(12, 30), rng.integers(20, 45)  # Non-square, varies per case.
  features = rng.standard_normal((height, width, 8)).astype(np.float32)
  boxes = random_boxes(rng, int(rng.integers(10, 40)), height / scale, width / scale)
  ours = jitted_roi_align(jnp.asarray(features), jnp.asarray(boxes), output_size, scale,
                          sampling_ratio, aligned)
  theirs, _ = torch_roi_align(torch, torchvision, features, boxes, output_size, scale,
                              sampling_ratio, aligned)
  assert ours.shape == (len(boxes), output_size, output_size, 8)
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=ATOL)


@pytest.mark.reference
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gradient_matches_torchvision(aligned, seed):
  torch, torchvision = torch_or_skip()
  rng = np.random.default_rng(seed)
  scale, sampling_ratio, output_size = (0.5, 2, 7) if seed == 0 else (1.0, 3, (5, 9))
  features = rng.standard_normal((24, 37, 8)).astype(np.float32)
  boxes = random_boxes(rng, 30, 24 / scale, 37 / scale)
  out_shape = (len(boxes),) + ((output_size,) * 2 if isinstance(output_size, int) else output_size)
  cotangent = rng.standard_normal(out_shape + (8,)).astype(np.float32)
  loss = lambda x: jnp.sum(
      roi_align(x, jnp.asarray(boxes), output_size, scale, sampling_ratio, aligned) * cotangent)
  ours = jax.jit(jax.grad(loss))(jnp.asarray(features))
  theirs_out, theirs = torch_roi_align(torch, torchvision, features, boxes, output_size, scale,
                                       sampling_ratio, aligned, cotangent)
  assert theirs_out.shape == out_shape + (8,)
  # A pixel sums up to ~N * S * S terms of size ~1, so allow a little more than ATOL.
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=5 * ATOL)
  assert np.abs(theirs).max() > 1.0  # The comparison is not vacuous.


@pytest.mark.reference
@pytest.mark.parametrize("shape", [(1, 9), (7, 1), (1, 1), (2, 2)])
def test_roi_align_degenerate_maps(shape):
  torch, torchvision = torch_or_skip()
  rng = np.random.default_rng(sum(shape))
  features = rng.standard_normal(shape + (3,)).astype(np.float32)
  boxes = random_boxes(rng, 10, shape[0] * 4.0, shape[1] * 4.0)
  for aligned in (False, True):
    ours = jitted_roi_align(jnp.asarray(features), jnp.asarray(boxes), 7, 0.25, 2, aligned)
    theirs, _ = torch_roi_align(torch, torchvision, features, boxes, 7, 0.25, 2, aligned)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=ATOL)


def test_roi_align_no_boxes():
  out = roi_align(jnp.ones((5, 6, 3)), jnp.zeros((0, 4)), (7, 5))
  assert out.shape == (0, 7, 5, 3)


FPN_IMAGE = (256, 320)  # (H, W): maps 64x80, 32x40, 16x20, 8x10 for P2..P5.
FPN_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def fpn_inputs(rng, channels=8, n=60):
  """P2..P5 maps [H_l, W_l, C] and boxes whose sizes reach every level."""
  h, w = FPN_IMAGE
  maps = [rng.standard_normal((int(h * s), int(w * s), channels)).astype(np.float32)
          for s in FPN_SCALES]
  side = np.exp(rng.uniform(np.log(4), np.log(700), n))  # sqrt(area) from 4 to 700 px.
  ratio = np.exp(rng.uniform(-1, 1, n))
  bw, bh = side * np.sqrt(ratio), side / np.sqrt(ratio)
  cx, cy = rng.uniform(-20, w + 20, n), rng.uniform(-20, h + 20, n)
  boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
  boxes = np.concatenate([boxes, [[0, 0, w, h], [10, 10, 10, 10], [0, 0, 112, 112],
                                  [0, 0, 224, 224], [5, 5, 453, 453]]])
  return maps, boxes.astype(np.float32)


def torch_multiscale(torch, torchvision, maps, boxes, output_size, cotangent=None):
  """torchvision.ops.MultiScaleRoIAlign on NHWC maps -> (output NHWC, grads NHWC or None)."""
  names = [f"p{i + 2}" for i in range(len(maps))]
  xs = [torch.from_numpy(np.ascontiguousarray(m.transpose(2, 0, 1)))[None] for m in maps]
  for x in xs:
    x.requires_grad_(cotangent is not None)
  pooler = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio=2)
  out = pooler(dict(zip(names, xs)), [torch.from_numpy(boxes)], [FPN_IMAGE])
  assert pooler.scales == list(FPN_SCALES)  # The inferred scales are the ones we pass.
  out_nhwc = out.permute(0, 2, 3, 1)
  if cotangent is None:
    return out_nhwc.detach().numpy(), None
  (out_nhwc * torch.from_numpy(cotangent)).sum().backward()
  return out_nhwc.detach().numpy(), [x.grad[0].permute(1, 2, 0).numpy() for x in xs]


@pytest.mark.reference
@pytest.mark.parametrize("output_size", [7, 14])
def test_multilevel_roi_align_matches_torchvision(output_size):
  torch, torchvision = torch_or_skip()
  rng = np.random.default_rng(output_size)
  maps, boxes = fpn_inputs(rng)
  cotangent = rng.standard_normal((len(boxes), output_size, output_size, 8)).astype(np.float32)

  def loss(maps):
    out = multilevel_roi_align(maps, jnp.asarray(boxes), output_size, FPN_SCALES)
    return jnp.sum(out * cotangent), out

  (_, ours), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      [jnp.asarray(m) for m in maps])
  theirs, theirs_grads = torch_multiscale(torch, torchvision, maps, boxes, output_size, cotangent)
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=ATOL)
  for g, tg in zip(grads, theirs_grads):
    np.testing.assert_allclose(np.asarray(g), tg, rtol=0, atol=5 * ATOL)
  levels = np.asarray(map_roi_levels(jnp.asarray(boxes), 2, 5))
  assert set(levels.tolist()) == {0, 1, 2, 3}  # Every level is exercised.


@pytest.mark.reference
def test_map_roi_levels_matches_level_mapper():
  torch, _ = torch_or_skip()
  from torchvision.ops.poolers import LevelMapper

  rng = np.random.default_rng(3)
  # Square boxes at and around the level boundaries (112, 224, 448), random ones, zero area.
  sides = np.array([0, 1e-3, 1, 56, 111.99, 112, 112.01, 223.9, 224, 224.1, 447.9, 448, 448.1,
                    896, 1e4], np.float32)
  square = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], axis=1) + 7.5
  random = rng.uniform(0, 600, (200, 2))
  random = np.concatenate([random, random + rng.uniform(0, 800, (200, 2))], axis=1)
  boxes = np.concatenate([square, random]).astype(np.float32)
  for k_min, k_max, canonical_scale, canonical_level in ((2, 5, 224, 4), (3, 6, 200, 5)):
    ours = map_roi_levels(jnp.asarray(boxes), k_min, k_max, canonical_scale, canonical_level)
    theirs = LevelMapper(k_min, k_max, canonical_scale, canonical_level)([torch.from_numpy(boxes)])
    assert ours.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_single_level_multilevel_is_roi_align():
  rng = np.random.default_rng(4)
  features = jnp.asarray(rng.standard_normal((20, 30, 4)), jnp.float32)
  boxes = jnp.asarray(random_boxes(rng, 20, 80, 120))
  single = jitted_roi_align(features, boxes, 7, 0.25, 2)
  multi = jitted_multilevel([features], boxes, 7, (0.25,))
  np.testing.assert_array_equal(np.asarray(single), np.asarray(multi))


def test_batched_forms_match_per_image():
  rng = np.random.default_rng(5)
  features = jnp.asarray(rng.standard_normal((2, 20, 30, 4)), jnp.float32)
  boxes = jnp.asarray(np.stack([random_boxes(rng, 6, 80, 120) for _ in range(2)]))
  out = jax.jit(lambda f, b: roi_align_batched(f, b, (7, 6), 0.25, 2, True))(features, boxes)
  assert out.shape == (2, 20, 7, 6, 4)
  vmapped = jax.jit(jax.vmap(lambda f, b: roi_align(f, b, (7, 6), 0.25, 2, True)))(features, boxes)
  np.testing.assert_allclose(np.asarray(out), np.asarray(vmapped), rtol=0, atol=ATOL)
  for b in range(2):
    np.testing.assert_allclose(np.asarray(out[b]), np.asarray(
        jitted_roi_align(features[b], boxes[b], (7, 6), 0.25, 2, True)), rtol=0, atol=ATOL)

  maps, fpn_boxes = zip(*[fpn_inputs(np.random.default_rng(s), channels=4, n=10) for s in (6, 7)])
  maps = [jnp.asarray(np.stack(level)) for level in zip(*maps)]
  fpn_boxes = jnp.asarray(np.stack(fpn_boxes))
  out = jax.jit(lambda m, b: multilevel_roi_align_batched(m, b, 7, FPN_SCALES))(maps, fpn_boxes)
  assert out.shape == (2, fpn_boxes.shape[1], 7, 7, 4)
  for b in range(2):
    np.testing.assert_allclose(np.asarray(out[b]), np.asarray(jitted_multilevel(
        [m[b] for m in maps], fpn_boxes[b], 7, FPN_SCALES)), rtol=0, atol=ATOL)


@pytest.mark.reference
def test_bfloat16_features():
  torch, torchvision = torch_or_skip()
  rng = np.random.default_rng(8)
  features = jnp.asarray(rng.standard_normal((24, 37, 8)), jnp.bfloat16)
  boxes = random_boxes(rng, 30, 96, 148)
  out = jitted_roi_align(features, jnp.asarray(boxes), 7, 0.25, 2)
  assert out.dtype == jnp.bfloat16
  # Reference: torchvision in float32 on the same (bfloat16-rounded) values. Accumulating in
  # float32, we differ from it only by the final rounding to bfloat16 (relative 2^-8).
  theirs, _ = torch_roi_align(torch, torchvision, np.asarray(features, np.float32), boxes, 7, 0.25,
                              2, False)
  np.testing.assert_allclose(np.asarray(out, np.float32), theirs, rtol=2 ** -8, atol=1e-6)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(roi_align(x, jnp.asarray(boxes), 7, 0.25, 2))))(
      features)
  assert grad.dtype == jnp.bfloat16 and grad.shape == features.shape


def test_jit_traces_once():
  rng = np.random.default_rng(9)
  features = jnp.asarray(rng.standard_normal((24, 37, 8)), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def pool(features, boxes):
    return multilevel_roi_align([features, features[::2, ::2]], boxes, 7, (0.5, 0.25))

  for seed in range(3):  # New box values, same shapes: no retrace.
    boxes = jnp.asarray(random_boxes(np.random.default_rng(seed), 10, 48, 74))
    assert pool(features, boxes).shape == (24, 7, 7, 8)


@pytest.mark.parametrize("sampling_ratio", [-1, 1.5])
def test_negative_or_fractional_sampling_ratio_is_rejected(sampling_ratio):
  """0 is adaptive sampling (tests/ops/test_roi_variants.py); below 0 or not an int, an error."""
  with pytest.raises(ValueError, match="sampling_ratio"):
    roi_align(jnp.zeros((8, 8, 2)), jnp.zeros((3, 4)), 7, sampling_ratio=sampling_ratio)
  with pytest.raises(ValueError, match="sampling_ratio"):
    multilevel_roi_align([jnp.zeros((8, 8, 2))], jnp.zeros((3, 4)), 7, [1.0],
                         sampling_ratio=sampling_ratio)


def test_wrong_ranks_are_rejected():
  with pytest.raises(ValueError, match="features"):
    roi_align(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 4)), 7)
  with pytest.raises(ValueError, match="features"):
    roi_align(jnp.zeros((8, 8)), jnp.zeros((3, 4)), 7)
  with pytest.raises(ValueError, match="boxes"):
    roi_align(jnp.zeros((8, 8, 2)), jnp.zeros((3, 5)), 7)
  with pytest.raises(ValueError, match="boxes"):
    roi_align(jnp.zeros((8, 8, 2)), jnp.zeros((4,)), 7)
  with pytest.raises(ValueError, match="feature map"):
    multilevel_roi_align([jnp.zeros((8, 8))], jnp.zeros((3, 4)), 7, [1.0])
  with pytest.raises(ValueError, match="scale"):
    multilevel_roi_align([jnp.zeros((8, 8, 2))] * 2, jnp.zeros((3, 4)), 7, [1.0])
  with pytest.raises(ValueError, match="consecutive"):
    multilevel_roi_align([jnp.zeros((8, 8, 2)), jnp.zeros((2, 2, 2))], jnp.zeros((3, 4)), 7,
                         [1 / 4, 1 / 16])
  with pytest.raises(ValueError, match="output_size"):
    roi_align(jnp.zeros((8, 8, 2)), jnp.zeros((3, 4)), 0)
  with pytest.raises(ValueError):
    roi_align_batched(jnp.zeros((8, 8, 2)), jnp.zeros((3, 4)), 7)
  with pytest.raises(ValueError):
    multilevel_roi_align_batched([jnp.zeros((8, 8, 2))], jnp.zeros((2, 3, 4)), 7, [1.0])
  with pytest.raises(ValueError, match="boxes"):
    roi_align_batched(jnp.zeros((2, 8, 8, 2)), jnp.zeros((3, 5, 4)), 7)


def test_extents_equal_pooling_the_cropped_maps():
  """A map stored on a larger canvas, with garbage past each image's valid extent, pools exactly
  like the cropped map when `extents` names that extent (bucketed inference relies on it)."""
  from maskrcnn_jax.ops.roi_align import multilevel_roi_align_batched
  rng = np.random.default_rng(7)
  valid = [(40, 56), (48, 32)]  # per image, level-0 (stride 4) extent
  canvas = (48, 64)
  feats = [rng.normal(size=(2, canvas[0] >> l, canvas[1] >> l, 5)).astype(np.float32)
           for l in range(4)]
  boxes = np.stack([np.array([[0, 0, 4 * w, 4 * h], [10, 20, 4 * w, 4 * h - 3],
                              [4 * w - 30, 4 * h - 30, 4 * w, 4 * h], [5, 5, 60, 90]], np.float32)
                    for h, w in valid])
  scales = [0.25, 0.125, 0.0625, 0.03125]
  ext = np.array([[[h >> l, w >> l] for l in range(4)] for h, w in valid], np.int32)
  got = np.asarray(multilevel_roi_align_batched(feats, boxes, 7, scales, extents=ext))
  for b, (h, w) in enumerate(valid):
    cropped = [f[b:b + 1, :h >> l, :w >> l] for l, f in enumerate(feats)]
    ref = np.asarray(multilevel_roi_align_batched(cropped, boxes[b:b + 1], 7, scales))
    np.testing.assert_allclose(got[b], ref[0], atol=1e-6)
  with pytest.raises(ValueError, match="extents"):
    multilevel_roi_align_batched(feats, boxes, 7, scales, extents=ext[:, :2])


def test_ops_package_exports_the_functions():
  """`from maskrcnn_jax.ops import roi_align` gives the function, as torchvision.ops does, and the
  modules stay importable by name."""
  import maskrcnn_jax.ops as ops
  from maskrcnn_jax.ops import batched_nms, nms, roi_align as exported
  from maskrcnn_jax.ops.nms import nms as nms_from_module
  from maskrcnn_jax.ops.roi_align import roi_align as from_module
  assert exported is from_module and callable(exported)
  assert nms is nms_from_module and callable(batched_nms)
  for name in ops.__all__:
    assert callable(getattr(ops, name)), name
