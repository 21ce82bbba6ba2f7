"""Keypoint ops and loss against torchvision's Keypoint R-CNN functions (`keypoints_to_heatmap`,
`keypointrcnn_loss`, `heatmaps_to_keypoints`, `F.interpolate`) on fresh random inputs: points on
RoI edges, unlabelled, occluded and outside points, horizontally flipped examples, RoIs from under
a pixel to larger than the decoding canvases."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling.losses import keypoint_loss
from maskrcnn_jax.ops.keypoints import (
    decode_grids,
    heatmaps_to_keypoints,
    keypoints_to_heatmap,
    upsample2x_bilinear,
)
from tests.conftest import torch_or_skip

S = 56
K = 17
FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]  # COCO's left/right swap


def random_rois(rng, n, extent=120.0):
  xy = rng.uniform(-10, extent, size=(n, 2))
  wh = rng.uniform(1.0, extent / 2, size=(n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def random_keypoints(rng, rois):
  """Points scattered over (and beyond) each RoI, v in {0, 1, 2}, some exactly on the right /
  bottom edges; unlabelled ones zeroed as COCO stores them."""
  n = len(rois)
  lo, hi = rois[:, None, :2], rois[:, None, 2:]
  t = rng.uniform(-0.2, 1.2, size=(n, K, 2))
  kp = np.zeros((n, K, 3), np.float32)
  kp[..., :2] = lo + t * (hi - lo)
  kp[..., 2] = rng.integers(0, 3, size=(n, K))
  kp[:, 0, 0] = rois[:, 2]  # on the right edge
  kp[:, 1, 1] = rois[:, 3]  # on the bottom edge
  kp[:, 2, :2] = rois[:, :2]  # the top-left corner
  kp[kp[..., 2] == 0] = 0.0
  return kp


def flip(kp, rois, width):
  """A horizontally flipped example: x -> width - x, left and right points swapped."""
  kp = kp[:, FLIP].copy()
  kp[..., 0] = np.where(kp[..., 2] > 0, width - kp[..., 0], 0.0)
  rois = np.stack([width - rois[:, 2], rois[:, 1], width - rois[:, 0], rois[:, 3]], axis=1)
  return kp, rois


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heatmap_targets_equal_torchvision(seed):
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import keypoints_to_heatmap as tv_targets
  rng = np.random.default_rng(seed)
  rois = random_rois(rng, 64)
  kp = random_keypoints(rng, rois)
  edge = None
  for kp_i, rois_i in ((kp, rois), flip(kp, rois, 130.0)):
    ref_t, ref_v = tv_targets(torch.from_numpy(kp_i), torch.from_numpy(rois_i), S)
    t, v = jax.jit(keypoints_to_heatmap, static_argnums=2)(kp_i, rois_i, S)
    np.testing.assert_array_equal(np.asarray(v), ref_v.numpy().astype(bool))
    np.testing.assert_array_equal(np.asarray(t), ref_t.numpy())
    assert 0.2 < ref_v.numpy().mean() < 0.8  # both kinds well represented
    if edge is None:  # unflipped: point 0 on the right edge goes to the last column
      edge = ref_t.numpy()[:, 0][ref_v.numpy()[:, 0] > 0] % S
      assert len(edge) > 5 and (edge == S - 1).all()


def test_degenerate_rois_have_no_targets_off_their_edge():
  """Zero width (height): a point off the RoI's line is no target (torchvision casts NaN there,
  undefined); one on it is, in the last column (row), as torchvision's edge rule puts it."""
  rois = np.array([[5, 5, 5, 9], [3, 2, 8, 2]], np.float32)
  kp = np.full((2, K, 3), 6.0, np.float32)
  _, valid = keypoints_to_heatmap(kp, rois, S)
  assert not np.asarray(valid).any()
  kp[0, :, 0] = 5.0
  targets, valid = keypoints_to_heatmap(kp, rois, S)
  assert np.asarray(valid)[0].all() and not np.asarray(valid)[1].any()
  assert (np.asarray(targets)[0] % S == S - 1).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_equals_keypointrcnn_loss(seed):
  """Two images' proposals (one flipped), matched to their objects, as torchvision's RoIHeads
  passes them: the loss over the whole batch's valid points."""
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import keypointrcnn_loss
  rng = np.random.default_rng(seed)
  n_gt, n = 5, 40
  gt_rois = random_rois(rng, n_gt)
  gt_kp = random_keypoints(rng, gt_rois)
  gt_kp_flip, gt_rois_flip = flip(gt_kp, gt_rois, 130.0)
  images = []
  for g_kp, g_rois in ((gt_kp, gt_rois), (gt_kp_flip, gt_rois_flip)):
    idx = rng.integers(0, n_gt, size=n)
    props = g_rois[idx] + rng.normal(0, 3, size=(n, 4)).astype(np.float32)
    images.append((g_kp, props, idx))
  logits = rng.normal(0, 2, size=(2, n, K, S, S)).astype(np.float32)
  ref = keypointrcnn_loss(torch.from_numpy(logits.reshape(2 * n, K, S, S)),
                          [torch.from_numpy(p) for _, p, _ in images],
                          [torch.from_numpy(g) for g, _, _ in images],
                          [torch.from_numpy(i) for _, _, i in images]).item()
  points = np.stack([g[i] for g, _, i in images])
  props = np.stack([p for _, p, _ in images])
  targets, valid = jax.vmap(keypoints_to_heatmap, in_axes=(0, 0, None))(points, props, S)
  ours = float(jax.jit(keypoint_loss)(logits, targets, valid))
  assert abs(ours - ref) <= 1e-5 * max(1.0, abs(ref)), (ours, ref)
  # One image alone is torchvision's one-image batch.
  ref0 = keypointrcnn_loss(torch.from_numpy(logits[0]), [torch.from_numpy(props[0])],
                           [torch.from_numpy(gt_kp)], [torch.from_numpy(images[0][2])]).item()
  assert abs(float(keypoint_loss(logits[0], targets[0], valid[0])) - ref0) <= 1e-5 * abs(ref0)


def test_loss_without_valid_points_is_zero():
  logits = jnp.ones((3, K, S, S))
  assert float(keypoint_loss(logits, jnp.zeros((3, K), jnp.int32),
                             jnp.zeros((3, K), bool))) == 0.0


def test_upsample_equals_interpolate():
  torch, _ = torch_or_skip()
  import torch.nn.functional as F
  x = np.random.default_rng(0).normal(size=(3, K, 28, 28)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x), scale_factor=2.0, mode="bilinear",
                      align_corners=False, recompute_scale_factor=False).numpy()
  np.testing.assert_allclose(np.asarray(jax.jit(upsample2x_bilinear)(x)), ref, rtol=0,
                             atol=1e-6)


def test_decode_grids():
  assert decode_grids(1344) == (64, 128, 256, 512, 1024, 1344)
  assert decode_grids(64) == (64,)
  assert decode_grids(40) == (40,)


@functools.partial(jax.jit, static_argnums=2)
def _decode(maps, rois, max_size):
  return heatmaps_to_keypoints(maps, rois, max_size)


@pytest.mark.parametrize("seed", [0, 1])
def test_decoding_equals_heatmaps_to_keypoints(seed):
  """Boxes from under a pixel (clamped to 1) to 300 px, fractional and integral sides, on every
  canvas of the ladder up to 320; torchvision's per-box bicubic resize and argmax."""
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as tv_decode
  rng = np.random.default_rng(seed)
  sides = np.array([0.4, 1.0, 3.7, 56.0, 63.2, 64.0, 64.5, 100.0, 127.9, 128.0, 200.3, 255.5,
                    257.0, 300.0, 319.4])
  n = len(sides)
  xy = rng.uniform(0, 20, size=(n, 2))
  wh = np.stack([sides, rng.permutation(sides)], axis=1)
  rois = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
  maps = rng.normal(0, 3, size=(n, K, S, S)).astype(np.float32)
  ref_xy, ref_scores = tv_decode(torch.from_numpy(maps), torch.from_numpy(rois))
  xy_, scores = _decode(maps, rois, 320)
  ref_xy, xy_ = ref_xy.numpy(), np.asarray(xy_)
  dist = np.hypot(*(ref_xy[..., :2] - xy_[..., :2]).transpose(2, 0, 1))
  assert dist.max() < 1e-3, dist.max()  # the same cell everywhere (rounding of x1 + offset only)
  np.testing.assert_array_equal(xy_[..., 2], 1.0)
  np.testing.assert_allclose(np.asarray(scores), ref_scores.numpy(), rtol=0, atol=1e-4)


def test_decoding_caps_boxes_beyond_max_size():
  """A box larger than max_size is decoded on the largest canvas: its points stay finite and in
  the box's top-left max_size x max_size (documented)."""
  maps = np.random.default_rng(0).normal(size=(1, K, S, S)).astype(np.float32)
  rois = np.array([[10, 10, 300, 200]], np.float32)
  xy, _ = _decode(maps, rois, 64)
  xy = np.asarray(xy)
  assert np.isfinite(xy).all()
  assert (xy[..., :2] < 10 + 64).all() and (xy[..., :2] > 10).all()
