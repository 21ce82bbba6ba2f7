"""numpy inference preprocessing against torchvision's GeneralizedRCNNTransform (eval mode)."""
import numpy as np
import pytest

from maskrcnn_jax.data import preprocess
from tests.conftest import torch_or_skip

SIZES = [(427, 640), (333, 500), (480, 640), (640, 427), (1000, 1500), (103, 103), (600, 2000),
         (37, 51)]


def test_preprocess_has_no_tf_or_jax_at_import():
  import ast
  import inspect
  tree = ast.parse(inspect.getsource(preprocess))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.add((node.module or "").split(".")[0])
  assert names <= {"math", "numpy"}, names


def test_resized_size_bounds():
  for h, w in SIZES:
    nh, nw = preprocess.resized_size(h, w)
    assert max(nh, nw) <= 1333
    assert min(nh, nw) <= 800
    assert min(nh, nw) >= 799 or max(nh, nw) >= 1332


def test_resize_identity_and_constant():
  img = np.random.default_rng(0).random((13, 17, 3), dtype=np.float32)
  np.testing.assert_array_equal(preprocess.resize_bilinear(img, 13, 17), img)
  const = np.full((9, 11, 2), 3.5, np.float32)
  out = preprocess.resize_bilinear(const, 20, 7)
  assert out.shape == (20, 7, 2)
  np.testing.assert_allclose(out, 3.5, rtol=0, atol=1e-6)


def test_normalize_values():
  img = np.array([[[0, 255, 128]]], np.uint8)
  out = preprocess.normalize(img)
  expect = (np.array([0, 1, 128 / 255.0]) - np.array(preprocess.IMAGE_MEAN)) / np.array(
      preprocess.IMAGE_STD)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], expect, rtol=0, atol=1e-6)


@pytest.mark.reference
@pytest.mark.parametrize("hw", SIZES)
def test_matches_generalized_rcnn_transform(hw):
  torch, _ = torch_or_skip()
  from torchvision.models.detection.transform import GeneralizedRCNNTransform
  h, w = hw
  rng = np.random.default_rng(h * 7919 + w)
  img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  t = GeneralizedRCNNTransform(800, 1333, list(preprocess.IMAGE_MEAN), list(preprocess.IMAGE_STD))
  t.eval()
  x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
  with torch.no_grad():
    image_list, _ = t([x])
  (th, tw), = image_list.image_sizes
  ref = image_list.tensors[0, :, :th, :tw].permute(1, 2, 0).numpy()
  assert preprocess.resized_size(h, w) == (th, tw)
  out, scale = preprocess.preprocess_for_inference(img)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
  assert scale == (th / h, tw / w)
  # Step by step too: normalize equals torchvision's normalize exactly.
  with torch.no_grad():
    ref_norm = t.normalize(x).permute(1, 2, 0).numpy()
  np.testing.assert_array_equal(preprocess.normalize(img), ref_norm)


@pytest.mark.reference
@pytest.mark.parametrize("in_hw,out_hw", [
    ((427, 640), (800, 1199)), ((333, 500), (50, 71)), ((7, 9), (7, 23)), ((1, 5), (3, 2)),
    ((64, 64), (31, 97))])
def test_resize_bilinear_matches_interpolate(in_hw, out_hw):
  torch, _ = torch_or_skip()
  img = np.random.default_rng(1).random(in_hw + (3,), dtype=np.float32) * 10
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(img).permute(2, 0, 1)[None], size=out_hw, mode="bilinear",
      align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
  out = preprocess.resize_bilinear(img, *out_hw)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
