"""Mask R-CNN side by side with torchvision: converted random-init weights, real photos, stage by stage.

torchvision runs one image per call (batching pads to the largest image, which adds anchors).
Measured figures are printed (run with -s) and asserted.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maskrcnn_jax
from maskrcnn_jax.convert import from_torchvision
from maskrcnn_jax.data.preprocess import normalize, resize_bilinear, resized_size
from tests.conftest import torch_or_skip
from tests.reference import tv_models

pytestmark = [pytest.mark.reference, pytest.mark.slow]


@pytest.fixture(scope="module")
def r50():
  torch, _ = torch_or_skip()
  tv = tv_models.build_torchvision(depth=50, seed=0)
  model, variables = from_torchvision(tv.state_dict(), backbone="resnet50")
  return tv, model, variables


@pytest.fixture(scope="module")
def photos():
  return tv_models.photos()


def _torch_run(tv, image):
  import torch
  with torch.no_grad():
    x = tv_models.to_tensor(image)
    il, _ = tv.transform([x])
    feats = tv.backbone(il.tensors)
    props, _ = tv.rpn(il, feats)
    out = tv([x])[0]
  return il, feats, props[0].numpy(), {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def r50_runs(r50, photos):
  tv = r50[0]
  return {name: _torch_run(tv, im) for name, im in photos.items()}


def _ref_dets(out):
  return dict(boxes=out["boxes"], scores=out["scores"], labels=out["labels"],
              masks=out["masks"][:, 0])


def test_preprocessing_matches_transform(r50_runs, photos):
  for name, image in photos.items():
    il = r50_runs[name][0]
    h, w = resized_size(*image.shape[:2])
    assert (h, w) == tuple(il.image_sizes[0]), name
    ours = resize_bilinear(normalize(image), h, w)
    ref = il.tensors[0].permute(1, 2, 0).numpy()
    assert ref.shape[:2] == (-(-h // 32) * 32, -(-w // 32) * 32)
    np.testing.assert_allclose(ours, ref[:h, :w], atol=1e-5, err_msg=name)
    assert np.all(ref[h:] == 0) and np.all(ref[:, w:] == 0)


def test_fpn_outputs_match(r50, r50_runs):
  _, model, variables = r50
  for name, (il, feats, _, _) in r50_runs.items():
    x = jnp.asarray(il.tensors.permute(0, 2, 3, 1).numpy())
    ours = model.apply(variables, x, method=type(model).features)
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
  return jax.device_get(model.apply(variables, x, sizes, padded))


def test_rpn_proposals_match(r50, r50_runs):
  _, model, variables = r50
  for name, (il, _, ref_props, _) in r50_runs.items():
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


def _check_detections(tv_out, ours, label, min_rate=0.99):
  stats = tv_models.match_detections(_ref_dets(tv_out), ours)
  print(f"{label}: {stats}")
  assert stats["n_ref"] > 0, "the reference model must detect something"
  assert stats["rate"] >= min_rate, (label, stats)
  assert stats["mask_ok_rate"] >= 0.99 and stats["min_mask_iou"] >= 0.9, (label, stats)
  return stats


def test_detections_match_exact_mode(r50, r50_runs, photos):
  _, model, variables = r50
  images = list(photos.values())
  results = maskrcnn_jax.predict(model, variables, images, exact_padding=True)
  for (name, run), ours in zip(r50_runs.items(), results):
    assert ours["masks"].shape[1:] == photos[name].shape[:2]
    _check_detections(run[3], ours, f"R50 exact {name}")


def test_detections_bucketed_mode_match_rate(r50, r50_runs, photos):
  _, model, variables = r50
  results = maskrcnn_jax.predict(model, variables, list(photos.values()))
  rates = []
  for (name, run), ours in zip(r50_runs.items(), results):
    stats = tv_models.match_detections(_ref_dets(run[3]), ours)
    print(f"R50 bucketed {name}: {stats}")
    rates.append(stats["rate"])
  # Bucketed padding changes features near the padded border; most detections still agree.
  assert np.mean(rates) >= 0.8, rates


def test_r101_detections_match():
  torch, _ = torch_or_skip()
  image = tv_models.photos()["coffee"]
  tv = tv_models.build_torchvision(depth=101, seed=1, calibration_image=image)
  model, variables = from_torchvision(tv.state_dict(), backbone="resnet101")
  il, feats, _, out = _torch_run(tv, image)
  x = jnp.asarray(il.tensors.permute(0, 2, 3, 1).numpy())
  fpn = model.apply(variables, x, method=type(model).features)
  for level, ref in enumerate(feats.values()):
    ref = ref.permute(0, 2, 3, 1).numpy()
    rel = np.abs(np.asarray(fpn[level]) - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, (level, rel)
  ours = maskrcnn_jax.predict(model, variables, [image], exact_padding=True)[0]
  _check_detections(out, ours, "R101 exact coffee")
