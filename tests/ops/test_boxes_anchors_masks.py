"""Box coding, anchors and mask pasting against torchvision (and float64 numpy for IoU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import anchors as anchor_ops, boxes as box_ops
from maskrcnn_jax.ops.masks import paste_masks
from tests.conftest import torch_or_skip
from tests.reference.tv_models import box_iou


def _random_boxes(rng, n, size=200.0):
  xy = rng.uniform(-20, size, (n, 2))
  wh = rng.uniform(0.5, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_iou_and_area_vs_float64(seed):
  rng = np.random.default_rng(seed)
  a, b = _random_boxes(rng, 37), _random_boxes(rng, 23)
  b[:3] = a[:3]  # identical pairs
  b[3] = [5, 5, 5, 9]  # zero width
  np.testing.assert_allclose(np.asarray(box_ops.pairwise_iou(a, b)), box_iou(a, b), atol=1e-6)
  zero = np.zeros((2, 4), np.float32)
  assert np.all(np.asarray(box_ops.pairwise_iou(zero, zero)) == 0)  # empty union: 0, not NaN
  np.testing.assert_allclose(np.asarray(box_ops.box_area(a)),
                             (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), rtol=1e-6)


@pytest.mark.reference
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_clip_equal_torchvision(weights):
  torch, _ = torch_or_skip()
  from torchvision.models.detection._utils import BoxCoder
  from torchvision.ops import clip_boxes_to_image, remove_small_boxes
  rng = np.random.default_rng(3)
  anchors = _random_boxes(rng, 200) + 30
  gt = _random_boxes(rng, 200) + 30
  coder = BoxCoder(weights)
  ref = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
  ours = np.asarray(box_ops.encode_boxes(gt, anchors, weights))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # decode, including deltas beyond the log(1000/16) clamp, per class [N, K, 4]
  deltas = rng.normal(0, 3, (200, 5 * 4)).astype(np.float32)
  deltas[0, 2:4] = 50.0
  ref = coder.decode(torch.from_numpy(deltas), [torch.from_numpy(anchors)]).numpy()  # [N, 5, 4]
  ours = np.asarray(box_ops.decode_boxes(deltas.reshape(200, 5, 4), anchors[:, None], weights))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)
  assert np.isfinite(ours).all()
  # clipping and small-box removal
  ref_clip = clip_boxes_to_image(torch.from_numpy(ref.reshape(-1, 4)), (150, 170)).numpy()
  ours_clip = np.asarray(box_ops.clip_boxes(jnp.asarray(ours.reshape(-1, 4)), 150, 170))
  np.testing.assert_allclose(ours_clip, ref_clip, rtol=1e-5, atol=1e-3)
  keep = remove_small_boxes(torch.from_numpy(ref_clip), 1.0).numpy()
  ours = np.asarray(box_ops.box_sizes_at_least(ref_clip, 1.0))
  np.testing.assert_array_equal(np.nonzero(ours)[0], keep)


@pytest.mark.reference
@pytest.mark.parametrize("image_shape", [(800, 1216), (800, 800), (64, 96), (160, 224)])
def test_anchors_equal_torchvision(image_shape):
  torch, _ = torch_or_skip()
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  sizes = ((32,), (64,), (128,), (256,), (512,))
  ratios = ((0.5, 1.0, 2.0),) * 5
  gen = AnchorGenerator(sizes, ratios)
  h, w = image_shape
  grids = [(h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
  grids.append(((grids[-1][0] + 1) // 2, (grids[-1][1] + 1) // 2))
  feats = [torch.zeros(1, 1, gh, gw) for gh, gw in grids]
  ref = gen(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), feats)[0].numpy()
  cells = [anchor_ops.cell_anchors(s, r) for s, r in zip(sizes, ratios)]
  ours, valid = anchor_ops.multilevel_anchors(grids, (2, 3, 4, 5, 6), (h, w), cells)
  np.testing.assert_array_equal(np.asarray(ours), ref)
  assert np.asarray(valid).all()


def test_anchors_on_a_larger_canvas_reproduce_the_smaller_grid():
  cells = [anchor_ops.cell_anchors((s,), (0.5, 1.0, 2.0)) for s in (32, 64, 128, 256, 512)]
  levels = (2, 3, 4, 5, 6)
  grid = lambda h, w: [(anchor_ops.feature_grid_size(h, l), anchor_ops.feature_grid_size(w, l))
                       for l in levels]
  small, small_valid = anchor_ops.multilevel_anchors(grid(800, 800), levels, (800, 800), cells)
  big, big_valid = jax.jit(lambda s: anchor_ops.multilevel_anchors(grid(896, 1024), levels, s,
                                                                   cells))(jnp.array([800, 800]))
  assert np.asarray(small_valid).all()
  np.testing.assert_array_equal(np.asarray(big)[np.asarray(big_valid)], np.asarray(small))
  # P6 of an 800-pixel side has 13 cells of stride 800 // 13 = 61, as torchvision lays them out.
  assert anchor_ops.feature_grid_size(800, 6) == 13


@pytest.mark.reference
@pytest.mark.parametrize("seed", [0, 1])
def test_paste_masks_equal_torchvision(seed):
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import paste_masks_in_image
  rng = np.random.default_rng(seed)
  h, w = 97, 131
  # Detections are clipped to the image (torchvision's paste fails on boxes wholly outside it).
  boxes = np.clip(_random_boxes(rng, 12, size=120.0), 0, [w, h, w, h]).astype(np.float32)
  boxes[0] = [0, 0, w, h]          # whole image
  boxes[1] = [-30, -10, 20, 15]    # partly outside
  boxes[2] = [50.2, 40.7, 50.9, 41.1]  # sub-pixel
  boxes[3] = [w - 3, h - 2, w + 40, h + 9]  # past the bottom-right corner
  masks = rng.uniform(0, 1, (12, 28, 28)).astype(np.float32)
  ref = paste_masks_in_image(torch.from_numpy(masks[:, None]), torch.from_numpy(boxes), (h, w))
  ref = ref[:, 0].numpy()
  ours = np.asarray(jax.jit(paste_masks, static_argnums=(2, 3))(masks, boxes, h, w))
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # A larger canvas only adds pixels beyond the image.
  big = np.asarray(paste_masks(masks, boxes, h + 31, w + 5))
  np.testing.assert_allclose(big[:, :h, :w], ref, atol=1e-5)


def test_paste_masks_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\[N, S, S\]"):
    paste_masks(np.zeros((2, 28, 14), np.float32), np.zeros((2, 4), np.float32), 10, 10)
  with pytest.raises(ValueError, match="boxes"):
    paste_masks(np.zeros((2, 28, 28), np.float32), np.zeros((3, 4), np.float32), 10, 10)
