"""Mask Scoring R-CNN's MaskIoU head: its targets against a float64 raster reference, its loss
against numpy, its layers against a torch transcription of the official module, and the head in a
tiny model (trains, rescores masks, and the segm evaluation uses the rescored confidences)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from pycocotools import mask as mask_utils

from configs import tiny
from maskrcnn_jax.evaluation import coco_eval
from maskrcnn_jax.modeling.builder import build_model
from maskrcnn_jax.modeling.mask_iou_head import MaskIoUHead, maskiou_loss
from maskrcnn_jax.modeling.mask_rcnn import init_variables
from maskrcnn_jax.ops.masks import mask_iou_targets, project_mask_crops
from tests.conftest import quick_variables
from tests.modeling.test_heads import _batch as heads_batch

# -- targets ---------------------------------------------------------------------------------------

F = 4  # raster subpixels per image pixel
G = 8  # RoI mask grid (2S with S = 4)
SC = 28  # crop side


def _raster(crop, box, size=64):
  """The instance a crop describes (crop pixel (i, j) tiles its box uniformly), rasterized on a
  [size F, size F] subpixel grid; box sides are multiples of SC / F pixels."""
  x1, y1, x2, y2 = box
  ph, pw = (y2 - y1) * F // SC, (x2 - x1) * F // SC
  assert ph * SC == (y2 - y1) * F and pw * SC == (x2 - x1) * F
  out = np.zeros((size * F, size * F))
  out[y1 * F:y2 * F, x1 * F:x2 * F] = np.kron(crop.astype(np.float64), np.ones((ph, pw)))
  return out


def _reference(raster, roi, probs):
  """(targets [G, G], IoU, IoU within the RoI) by the definition, in pixels: the RoI cut out of
  the raster (shifted half a pixel, as the mask targets are), its cells' coverage, and the IoU of
  the predicted cells with the WHOLE instance (union clamped to one cell, as the official code);
  the last, for contrast, with the instance's part inside the RoI only."""
  x1, y1, x2, y2 = roi
  region = raster[y1 * F + F // 2:y2 * F + F // 2, x1 * F + F // 2:x2 * F + F // 2]
  ch, cw = region.shape[0] // G, region.shape[1] // G
  assert ch * G == region.shape[0] and cw * G == region.shape[1]
  targets = region.reshape(G, ch, G, cw).mean(axis=(1, 3))
  pred = np.asarray(probs, np.float64) > 0.5
  cell_px = (x2 - x1) * (y2 - y1) / G**2
  inter_px = np.sum(region * np.kron(pred, np.ones((ch, cw)))) / F**2
  full_px = raster.sum() / F**2
  union_px = max(pred.sum() * cell_px + full_px - inter_px, cell_px)
  inside_union_px = max(pred.sum() * cell_px + region.sum() / F**2 - inter_px, cell_px)
  return targets, inter_px / union_px, inter_px / inside_union_px


def _instances():
  """Three instances: an anti-aliased disc (14 x 14 px box), a tall random-coverage one (7 x 21)
  and an empty one."""
  yy, xx = np.mgrid[:SC, :SC] + 0.5
  disc = np.clip(11.0 - np.hypot(yy - 14, xx - 12), 0.0, 1.0)
  rng = np.random.default_rng(3)
  tall = rng.uniform(0, 1, (SC, SC)) * (rng.uniform(0, 1, (SC, SC)) > 0.3)
  crops = np.stack([disc, tall, np.zeros((SC, SC))]).astype(np.float32)
  boxes = np.array([[10, 12, 24, 26], [30, 8, 37, 29], [40, 40, 54, 54]])
  return crops, boxes


def test_targets_match_a_raster_reference():
  """Instances cut by their RoI count their full area; RoIs larger than, equal to, beside the
  instance; empty and full predictions; an empty instance."""
  crops, boxes = _instances()
  rasters = [_raster(c, b) for c, b in zip(crops, boxes)]
  rng = np.random.default_rng(0)
  # (roi, gt index, probabilities: None = the targets plus noise)
  cases = [
      ([10, 12, 18, 26], 0, None),          # the left half of the disc
      ([6, 8, 30, 32], 0, None),            # larger than the disc
      ([10, 12, 24, 26], 0, None),          # the disc's own box
      ([28, 4, 40, 16], 1, None),           # the top of the tall instance
      ([26, 6, 42, 32], 1, None),           # around the tall instance
      ([40, 2, 48, 10], 0, None),           # beside the disc: IoU 0
      ([40, 40, 54, 54], 2, None),          # an empty instance: IoU 0
      ([6, 8, 30, 32], 0, np.full((G, G), 0.2)),  # empty prediction: IoU 0
      ([10, 12, 18, 26], 0, np.full((G, G), 0.9)),  # the whole RoI predicted
      ([14, 16, 20, 24], 0, np.full((G, G), 0.9)),  # a RoI inside the disc
  ]
  targets, probs, ref, naive = [], [], [], []
  for roi, m, p in cases:
    t = _reference(rasters[m], roi, np.zeros((G, G)))[0]
    if p is None:
      p = np.clip(t + rng.normal(0, 0.3, t.shape), 0, 1)
    targets.append(t)
    probs.append(p)
    ref.append(_reference(rasters[m], roi, p)[1])
    naive.append(_reference(rasters[m], roi, p)[2])
  got = np.asarray(jax.jit(mask_iou_targets)(
      jnp.asarray(np.array(probs), jnp.float32), jnp.asarray(np.array(targets), jnp.float32),
      jnp.asarray([c[0] for c in cases], jnp.float32), jnp.asarray(crops),
      jnp.asarray(boxes, jnp.float32), jnp.asarray([c[1] for c in cases], jnp.int32)))
  ref, naive = np.array(ref), np.array(naive)
  # Instances cut by their RoI are not over-credited; one inside its RoI loses nothing.
  assert np.all(ref[[0, 3, 8, 9]] < naive[[0, 3, 8, 9]] - 0.05)
  assert ref[1] == pytest.approx(naive[1], abs=1e-12) and ref[1] > 0.5
  assert ref[5] == ref[6] == ref[7] == 0
  assert ref[5] == ref[6] == ref[7] == 0
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)


def test_targets_with_the_mask_heads_own_targets():
  """With the targets the mask head trains on (`project_mask_crops` of the crop, bilinear), the
  IoU stays close to the raster reference: the half-pixel conventions agree."""
  crops, boxes = _instances()
  crops = (crops > 0.5).astype(np.float32)
  raster = _raster(crops[0], boxes[0])
  rois = np.array([[10, 12, 18, 26], [6, 8, 30, 32], [10, 12, 24, 26], [14, 16, 20, 24],
                   [8, 10, 16, 30]], np.float32)
  rng = np.random.default_rng(4)
  probs = rng.uniform(0.3, 1.0, (len(rois), G, G)).astype(np.float32)
  idx = jnp.zeros(len(rois), jnp.int32)

  @jax.jit
  def iou(probs, rois, crops, boxes):
    targets = project_mask_crops(crops, boxes, idx, rois, G)
    return mask_iou_targets(probs, targets, rois, crops, boxes, idx)

  got = np.asarray(iou(probs, rois, crops, boxes.astype(np.float32)))
  ref = [_reference(raster, roi.astype(int), p)[1] for roi, p in zip(rois, probs)]
  np.testing.assert_allclose(got, ref, atol=0.01)


def test_targets_input_checks():
  crops, boxes = _instances()
  z = jnp.zeros((2, G, G))
  with pytest.raises(ValueError, match="mask_targets"):
    mask_iou_targets(z, jnp.zeros((2, G, G + 1)), jnp.zeros((2, 4)), crops, boxes,
                     jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="gt_index"):
    mask_iou_targets(z, z, jnp.zeros((2, 4)), crops, boxes, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="gt_boxes"):
    mask_iou_targets(z, z, jnp.zeros((2, 4)), crops, boxes[:2], jnp.zeros(2, jnp.int32))


# -- loss ------------------------------------------------------------------------------------------

def test_loss_matches_numpy():
  """The official l2_loss: 0.5 squared error over valid RoIs with a target above 0, per image,
  then the mean over images; an image with nothing to count gives 0."""
  rng = np.random.default_rng(1)
  b, p = 3, 12
  pred = rng.normal(0.5, 0.4, (b, p)).astype(np.float32)
  target = rng.uniform(0, 1, (b, p)).astype(np.float32)
  target[rng.uniform(0, 1, (b, p)) < 0.3] = 0.0
  valid = rng.uniform(0, 1, (b, p)) < 0.7
  valid[2] = False
  got = float(jnp.mean(jax.vmap(maskiou_loss)(pred, target, valid)))
  per_image = []
  for i in range(b):
    keep = valid[i] & (target[i] > 0)
    d = pred[i][keep].astype(np.float64) - target[i][keep]
    per_image.append(0.5 * np.sum(d * d) / keep.sum() if keep.any() else 0.0)
  assert per_image[2] == 0.0
  np.testing.assert_allclose(got, np.mean(per_image), rtol=1e-6)


# -- the module ------------------------------------------------------------------------------------

def _torch_official(torch, params, features, probs):
  """The official MaskIoUFeatureExtractor + MaskIoUPredictor forward (NCHW, any widths), with our
  parameters: max_pool2d(mask, 2, 2), cat after the features, 3x3 convs padding 1 (the last
  stride 2), flatten (c, h, w), fcs, the class fc."""
  fn = torch.nn.functional
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  x = torch.cat([t(features).permute(0, 3, 1, 2),
                 fn.max_pool2d(t(probs)[:, None], kernel_size=2, stride=2)], 1)
  convs = sorted(k for k in params if k.startswith("maskiou_fcn"))
  for i, name in enumerate(convs):
    w = t(params[name]["kernel"]).permute(3, 2, 0, 1)
    x = fn.relu(fn.conv2d(x, w, t(params[name]["bias"]), stride=2 if i == len(convs) - 1 else 1,
                          padding=1))
  c, h, w_ = x.shape[1:]
  x = x.reshape(x.shape[0], -1)
  fcs = sorted(k for k in params if k.startswith("maskiou_fc") and not k.startswith("maskiou_fcn"))
  for j, name in enumerate(fcs):
    k = t(params[name]["kernel"])
    if j == 0:  # our flatten is (h, w, c), torch's (c, h, w)
      k = k.reshape(h, w_, c, -1).permute(2, 0, 1, 3).reshape(c * h * w_, -1)
    x = fn.relu(fn.linear(x, k.T, t(params[name]["bias"])))
  return fn.linear(x, t(params["maskiou"]["kernel"]).T, t(params["maskiou"]["bias"])).numpy()


@pytest.mark.reference
@pytest.mark.parametrize("s", [7, 14])  # C4 (7 x 7 features, 14 x 14 masks) and FPN
def test_head_layers_match_the_official_module(s):
  torch = pytest.importorskip("torch")
  head = MaskIoUHead(num_classes=5, conv_layers=(16, 16, 16), fc_layers=(32, 24))
  rng = np.random.default_rng(2)
  features = rng.normal(0, 1, (3, s, s, 8)).astype(np.float32)
  probs = rng.uniform(0, 1, (3, 2 * s, 2 * s)).astype(np.float32)
  # Random parameters of the right shapes, biases too (no initializer to compile).
  shapes = jax.eval_shape(head.init, jax.random.key(0), features, probs)["params"]
  params = jax.tree.map(lambda a: (rng.normal(0, 1, a.shape) / np.sqrt(np.prod(a.shape[:-1])))
                        .astype(np.float32), shapes)
  got = np.asarray(head.apply({"params": params}, features, probs))
  ref = _torch_official(torch, jax.device_get(params), features, probs)
  assert got.shape == (3, 5)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="mask_probs"):
    head.apply({"params": params}, features, probs[:, :-1])


def test_head_initialization_follows_the_official_code():
  """Convs: Kaiming normal (fan out); hidden fcs: Kaiming uniform (a=1); class fc: N(0, 0.01);
  biases 0."""
  head = MaskIoUHead(num_classes=81, conv_layers=(64, 64), fc_layers=(256,))
  p = jax.jit(head.init)(jax.random.key(1, impl="rbg"), jnp.zeros((1, 14, 14, 64)),
                        jnp.zeros((1, 28, 28)))["params"]
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(p).items()}
  assert sorted(flat) == ["maskiou/bias", "maskiou/kernel", "maskiou_fc1/bias",
                          "maskiou_fc1/kernel", "maskiou_fcn1/bias", "maskiou_fcn1/kernel",
                          "maskiou_fcn2/bias", "maskiou_fcn2/kernel"]
  assert flat["maskiou_fcn1/kernel"].shape == (3, 3, 65, 64)  # features + the pooled mask
  assert all(not v.any() for k, v in flat.items() if k.endswith("bias"))
  np.testing.assert_allclose(flat["maskiou_fcn2/kernel"].std(), np.sqrt(2 / (64 * 9)), rtol=0.05)
  fc = flat["maskiou_fc1/kernel"]  # fan_in 7 * 7 * 64: uniform within sqrt(3 / fan_in)
  bound = np.sqrt(3 / fc.shape[0])
  assert np.abs(fc).max() <= bound and np.abs(fc).max() > 0.99 * bound
  np.testing.assert_allclose(flat["maskiou/kernel"].std(), 0.01, rtol=0.05)
  with pytest.raises(ValueError, match="conv_layers"):
    MaskIoUHead(num_classes=3, conv_layers=())


# -- in a model ------------------------------------------------------------------------------------

def _config(mask_iou_head="standard"):
  c = tiny.get_config()
  m = c.model
  m.rpn.post_nms_topk_train = 64
  m.rpn.pre_nms_topk_test = 100
  m.rpn.post_nms_topk_test = 32
  m.roi_sampler.batch_size_per_image = 32
  m.mask_sampler.num_rois = 8
  m.postprocess.score_threshold = 0.0
  m.postprocess.detections_per_image = 6
  m.mask_iou_head.update(dict(type=mask_iou_head, conv_layers=(16, 16), fc_layers=(32,)))
  return c


def _batch(n=2, size=64):
  """The heads tests' batch with disc-shaped instances (full-box masks would make every MaskIoU
  target the same)."""
  yy, xx = np.mgrid[:28, :28] + 0.5
  disc = (np.hypot(yy - 14, xx - 14) < 12).astype(np.float32)
  return dict(heads_batch(n, size), gt_masks=np.tile(disc, (n, 3, 1, 1)))


def test_config_switch_and_dependencies():
  off = build_model(_config("none").model)
  assert off.head_names == ("mask_head",) and "mask_scores" not in off.prediction_keys
  model = build_model(_config().model)
  assert model.head_names == ("mask_head", "mask_iou_head")
  assert model.loss_names[-1] == "loss_maskiou" and model.prediction_keys == ("masks",
                                                                             "mask_scores")
  assert dict(model.loss_weights)["loss_maskiou"] == 1.0
  c = _config()
  c.model.mask_on = False
  with pytest.raises(ValueError, match="mask_iou_head.*needs mask_head"):
    build_model(c.model)
  c = _config()
  c.model.mask_iou_head.type = "bogus"
  with pytest.raises(ValueError, match="mask_iou_head.type"):
    build_model(c.model)


def test_c4_model_shapes():
  """On a C4 trunk (7 x 7 res5 features, 14 x 14 masks) the head builds and its loss traces."""
  c = _config()
  c.model.backbone.type = "resnet_c4"
  c.model.mask_head.update(dict(layers=(), deconv_channels=16))
  model = build_model(c.model)
  shapes = jax.eval_shape(lambda k: init_variables(model, k), jax.random.key(0))
  p = shapes["params"]["mask_iou_head"]
  res5 = c.model.backbone.width_per_group * 32
  assert p["maskiou_fcn1"]["kernel"].shape == (3, 3, res5 + 1, 16)
  assert p["maskiou_fc1"]["kernel"].shape == (4 * 4 * 16, 32)  # 7 x 7 -> 4 x 4 by the stride 2
  batch = {k: jnp.asarray(v) for k, v in _batch(n=1).items()}
  losses = jax.eval_shape(lambda v: model.apply(v, batch, jax.random.split(jax.random.key(0), 1),
                                                method=model.losses, mutable=["batch_stats"])[0],
                          shapes)
  assert losses["loss_maskiou"].shape == ()


@pytest.fixture(scope="module")
def tiny_model():
  model = build_model(_config().model)
  return model, quick_variables(model)


def test_model_trains_the_head(tiny_model):
  """losses hold a finite loss_maskiou whose gradient reaches the MaskIoU head, and (the official
  code detaches neither) the mask head."""
  model, variables = tiny_model
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  keys = jax.random.split(jax.random.key(0), 2)

  heads = ("mask_iou_head", "mask_head")

  def maskiou(head_params):  # differentiated for the heads only: a smaller compile
    params = dict(variables["params"], **head_params)
    losses, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch,
                            keys, method=model.losses, mutable=["batch_stats"])
    return losses["loss_maskiou"], losses

  grads, losses = jax.jit(jax.grad(maskiou, has_aux=True))(
      {k: variables["params"][k] for k in heads})
  assert set(model.loss_names) <= set(losses)
  assert all(np.isfinite(float(v)) for v in losses.values())
  assert float(losses["loss_maskiou"]) > 0
  for section in heads:
    g = traverse_util.flatten_dict(jax.device_get(grads[section]))
    assert all(np.isfinite(v).all() for v in g.values())
    assert any(np.abs(v).max() > 0 for v in g.values()), section
  g = traverse_util.flatten_dict(jax.device_get(grads["mask_iou_head"]))
  assert np.abs(g[("maskiou", "kernel")]).max() > 0


def test_model_rescores_masks(tiny_model):
  """mask_scores = box score x the head's predicted IoU of the labelled class, 0 where invalid."""
  model, variables = tiny_model
  images = jnp.asarray(_batch()["image"])
  sizes = jnp.array([[64, 64], [48, 56]], jnp.int32)
  head_call = lambda mdl, method: isinstance(mdl, MaskIoUHead) and method == "__call__"
  out, inter = jax.jit(lambda v: model.apply(v, images, sizes, jnp.full((2, 2), 64, jnp.int32),
                                             capture_intermediates=head_call))(variables)
  raw = inter["intermediates"]["mask_iou_head"]["__call__"][0]  # [B * D, K]
  b, d = out["scores"].shape
  picked = np.take_along_axis(np.asarray(raw).reshape(b, d, -1),
                              np.asarray(out["labels"])[..., None], -1)[..., 0]
  valid = np.asarray(out["valid"])
  assert valid.any() and out["mask_scores"].shape == (b, d)
  expected = np.where(valid, np.asarray(out["scores"]) * picked, 0.0)
  np.testing.assert_allclose(np.asarray(out["mask_scores"]), expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(np.asarray(out["mask_scores"])[valid], np.asarray(out["scores"])[valid])


# -- evaluation ------------------------------------------------------------------------------------

def test_segm_records_use_mask_scores(tmp_path):
  """Two detections of one object: the better mask has the lower box score. Rescoring by
  mask_scores lifts segm AP to 1; the bbox records, and so bbox AP, keep the box scores."""
  h, w = 40, 50
  full = np.zeros((h, w), np.uint8)
  full[10:30, 10:40] = 1
  gt = dict(images=[dict(id=1, width=w, height=h, file_name="1.png")],
            categories=[dict(id=1, name="a")],
            annotations=[dict(id=1, image_id=1, category_id=1, iscrowd=0, bbox=[10, 10, 30, 20],
                              area=600.0, segmentation=mask_utils.encode(np.asfortranarray(full)))])
  gt["annotations"][0]["segmentation"]["counts"] = (
      gt["annotations"][0]["segmentation"]["counts"].decode())
  gt_path = tmp_path / "gt.json"
  gt_path.write_text(json.dumps(gt))
  poor = np.zeros((h, w), np.float32)
  poor[10:30, 10:20] = 1  # IoU 1/3
  pred = dict(boxes=np.array([[10, 10, 40, 30], [10, 10, 41, 30]], np.float32),
              scores=np.array([0.6, 0.9], np.float32), labels=np.array([1, 1]),
              masks=np.stack([full.astype(np.float32), poor]))
  rescored = dict(pred, mask_scores=np.array([0.55, 0.3], np.float32))
  plain_recs = coco_eval.to_coco_results(1, pred)
  recs = coco_eval.to_coco_results(1, rescored)
  assert [r["score"] for r in plain_recs] == [0.6, 0.9]
  # Written separately: a bbox record (box score) and a segm record (mask score) per detection.
  assert [sorted(r) for r in recs[:2]] == [["bbox", "category_id", "image_id", "score"],
                                           ["category_id", "image_id", "score", "segmentation"]]
  assert [r["score"] for r in coco_eval.task_records(recs, "segm")] == [0.55, 0.3]
  assert [r["score"] for r in coco_eval.task_records(recs, "bbox")] == [0.6, 0.9]
  assert [r["score"] for r in coco_eval.task_records(plain_recs, "segm")] == [0.6, 0.9]
  coco_eval.save_results(tmp_path / "results.json", recs)
  from_json = json.loads((tmp_path / "results.json").read_text())
  plain = coco_eval.evaluate(gt_path, plain_recs, verbose=False)
  new = coco_eval.evaluate(gt_path, from_json, verbose=False)
  assert new["bbox"] == plain["bbox"]
  assert plain["segm"]["AP50"] == pytest.approx(0.5, abs=0.01)
  assert new["segm"]["AP50"] == pytest.approx(1.0)
