"""Mask R-CNN (v1) side by side with torchvision, stage by stage: preprocessing, FPN outputs, RPN
proposals, on converted random-init weights and real photos.

torchvision runs one image per call (batching pads to the largest image, which adds anchors). In
the suite both sides run at a short side of 320 with 300 proposals (the detections of every model
of the family, this one included, are compared in test_family_vs_torchvision.py; full-size figures
come from benchmarks/bench_family.py). Measured figures are printed (run with -s) and asserted.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.convert import from_torchvision
from maskrcnn_jax.data.preprocess import normalize, resize_bilinear, resized_size
from tests.conftest import torch_or_skip
from tests.reference import tv_models

pytestmark = [pytest.mark.reference, pytest.mark.slow]


MIN_SIZE, MAX_SIZE, PROPOSALS = 320, 512, 300


@pytest.fixture(scope="module")
def r50():
  torch, _ = torch_or_skip()
  tv = tv_models.build_torchvision(depth=50, seed=0, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                   rpn_pre_nms_top_n_test=PROPOSALS,
                                   rpn_post_nms_top_n_test=PROPOSALS)
  model, variables = from_torchvision(tv.state_dict())
  model = model.clone(rpn=model.rpn.clone(pre_nms_topk_test=PROPOSALS,
                                          post_nms_topk_test=PROPOSALS))
  return tv, model, variables


@pytest.fixture(scope="module")
def photos():
  p = tv_models.photos()
  return {name: p[name] for name in ("astronaut", "coffee")}


def _torch_run(tv, image):
  import torch
  with torch.no_grad():
    x = tv_models.to_tensor(image)
    il, _ = tv.transform([x])
    feats = tv.backbone(il.tensors)
    props, _ = tv.rpn(il, feats)
  return il, feats, props[0].numpy()


@pytest.fixture(scope="module")
def r50_runs(r50, photos):
  tv = r50[0]
  return {name: _torch_run(tv, im) for name, im in photos.items()}


def test_preprocessing_matches_transform(r50_runs, photos):
  for name, image in photos.items():
    il = r50_runs[name][0]
    h, w = resized_size(*image.shape[:2], MIN_SIZE, MAX_SIZE)
    assert (h, w) == tuple(il.image_sizes[0]), name
    ours = resize_bilinear(normalize(image), h, w)
    ref = il.tensors[0].permute(1, 2, 0).numpy()
    assert ref.shape[:2] == (-(-h // 32) * 32, -(-w // 32) * 32)
    np.testing.assert_allclose(ours, ref[:h, :w], atol=1e-5, err_msg=name)
    assert np.all(ref[h:] == 0) and np.all(ref[:, w:] == 0)


def test_fpn_outputs_match(r50, r50_runs):
  _, model, variables = r50
  for name, (il, feats, _) in r50_runs.items():
    x = jnp.asarray(il.tensors.permute(0, 2, 3, 1).numpy())
    ours = jax.jit(lambda v, x: model.apply(v, x, method=type(model).features))(variables, x)
    for level, (key, ref) in enumerate(feats.items()):
      ref = ref.permute(0, 2, 3, 1).numpy()
      got = np.asarray(ours[level])
      assert got.shape == ref.shape, (name, key)
      rel = np.abs(got - ref).max() / np.abs(ref).max()
      print(f"FPN {name} {key}: max rel err {rel:.2e}")
      assert rel <= 1e-4, (name, key, rel)


def _our_forward(model, variables, il):
  x = jnp.asarray(il.tensors.permute(0, 2, 3, 1).numpy())
  sizes = jnp.asarray([list(il.image_sizes[0])], jnp.int32)
  padded = jnp.asarray([list(x.shape[1:3])], jnp.int32)
  return jax.device_get(jax.jit(model.apply)(variables, x, sizes, padded))


def test_rpn_proposals_match(r50, r50_runs):
  _, model, variables = r50
  for name, (il, _, ref_props) in r50_runs.items():
    out = _our_forward(model, variables, il)
    ours = out["proposals"][0][out["proposal_valid"][0]]
    assert len(ours) == len(ref_props), name
    iou = tv_models.box_iou(ref_props, ours)
    matched = (iou.max(1) >= 0.999).mean()
    # Same order, too, up to swaps of neighbours whose scores differ by float rounding.
    shift = np.abs(iou[:100].argmax(1) - np.arange(100)).max()
    print(f"RPN {name}: {len(ours)} proposals, {matched:.4f} matched at IoU>=0.999, "
          f"top-100 max rank shift {shift}")
    assert matched >= 0.99, (name, matched)
    assert shift <= 2, (name, shift)
