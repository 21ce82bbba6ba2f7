"""The evaluation path (predictions -> RLE -> JSON -> COCOeval) on hand-made data of known AP."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrcnn_jax.evaluation import coco_eval


def _gt(tmp_path):
  """Two 60x80 images; image 1: three 'a' squares, image 2: one 'a' and one 'b' rectangle."""
  objs = {1: [(1, (5, 5, 20, 20)), (1, (30, 10, 55, 30)), (1, (60, 40, 75, 55))],
          2: [(1, (10, 10, 40, 30)), (7, (45, 20, 70, 50))]}
  anns, aid = [], 1
  for img_id, items in objs.items():
    for cat, (x1, y1, x2, y2) in items:
      poly = [x1, y1, x2, y1, x2, y2, x1, y2]
      anns.append(dict(id=aid, image_id=img_id, category_id=cat, iscrowd=0,
                       bbox=[x1, y1, x2 - x1, y2 - y1], area=float((x2 - x1) * (y2 - y1)),
                       segmentation=[poly]))
      aid += 1
  data = dict(images=[dict(id=i, width=80, height=60, file_name=f"{i}.png") for i in objs],
              categories=[dict(id=1, name="a"), dict(id=7, name="b")], annotations=anns)
  path = tmp_path / "gt.json"
  path.write_text(json.dumps(data))
  return path, data


def _perfect_prediction(data, img_id, skip=()):
  """What predict() would return for a perfect model (labels are contiguous 1, 2 -> ids 1, 7)."""
  boxes, scores, labels, masks = [], [], [], []
  for a in data["annotations"]:
    if a["image_id"] != img_id or a["id"] in skip:
      continue
    x, y, w, h = a["bbox"]
    boxes.append([x, y, x + w, y + h])
    scores.append(0.9)
    labels.append({1: 1, 7: 2}[a["category_id"]])
    rle = mask_utils.frPyObjects(a["segmentation"], 60, 80)
    masks.append(mask_utils.decode(mask_utils.merge(rle)).astype(np.float32))
  return dict(boxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
              labels=np.array(labels), masks=np.array(masks).reshape(-1, 60, 80))


def _evaluate(tmp_path, gt_path, preds):
  records = []
  for img_id, pred in preds.items():
    records += coco_eval.to_coco_results(img_id, pred, {1: 1, 2: 7})
  out = tmp_path / "results.json"
  coco_eval.save_results(out, records)
  return coco_eval.evaluate(gt_path, json.loads(out.read_text()), verbose=False)


def test_perfect_predictions_give_ap_one(tmp_path):
  gt_path, data = _gt(tmp_path)
  stats = _evaluate(tmp_path, gt_path, {i: _perfect_prediction(data, i) for i in (1, 2)})
  for iou_type in ("bbox", "segm"):
    assert stats[iou_type]["AP"] == pytest.approx(1.0)
    assert stats[iou_type]["AP50"] == pytest.approx(1.0)
    assert stats[iou_type]["per_category"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}


def test_a_known_miss_gives_the_known_ap(tmp_path):
  gt_path, data = _gt(tmp_path)
  # Drop one of the four 'a' objects: recall 3/4 at precision 1, so 76 of COCO's 101 recall points
  # score 1 -> AP(a) = 76/101; 'b' stays perfect; the mean over categories follows.
  preds = {1: _perfect_prediction(data, 1, skip={2}), 2: _perfect_prediction(data, 2)}
  stats = _evaluate(tmp_path, gt_path, preds)
  expected_a = 76 / 101
  for iou_type in ("bbox", "segm"):
    assert stats[iou_type]["per_category"]["a"] == pytest.approx(expected_a, abs=1e-6)
    assert stats[iou_type]["AP"] == pytest.approx((expected_a + 1.0) / 2, abs=1e-6)


def test_empty_results_and_bad_ids(tmp_path):
  gt_path, data = _gt(tmp_path)
  stats = coco_eval.evaluate(gt_path, [], verbose=False)
  assert stats["bbox"]["AP"] == 0.0 and stats["segm"]["AP"] == 0.0
  rec = coco_eval.to_coco_results(99, _perfect_prediction(data, 1), {1: 1, 2: 7})
  with pytest.raises(ValueError, match="not in the ground truth"):
    coco_eval.evaluate(gt_path, rec, verbose=False)
  with pytest.raises(ValueError, match="no COCO category"):
    coco_eval.to_coco_results(2, _perfect_prediction(data, 2), {1: 1})


def test_rle_round_trip():
  rng = np.random.default_rng(0)
  m = rng.uniform(size=(37, 53)) > 0.5
  rle = coco_eval.encode_mask(m)
  json.dumps(rle)
  back = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
  np.testing.assert_array_equal(back.astype(bool), m)


# -- keypoints -------------------------------------------------------------------------------------

def _keypoint_gt(tmp_path, sigmas=None, k=4):
  """One 100x100 image, three 'figure' objects with k keypoints (some unlabelled), one with none
  labelled (ignored by COCO's keypoint evaluation)."""
  rng = np.random.default_rng(0)
  anns = []
  for i, (x1, y1, x2, y2) in enumerate([(5, 5, 40, 60), (50, 10, 90, 50), (20, 65, 60, 95)]):
    kp = np.zeros((k, 3))
    kp[:, 0] = rng.uniform(x1, x2, k)
    kp[:, 1] = rng.uniform(y1, y2, k)
    kp[:, 2] = 0 if i == 2 else rng.choice([1, 2], k)
    if i == 0:
      kp[0] = 0
    anns.append(dict(id=i + 1, image_id=1, category_id=1, iscrowd=0,
                     bbox=[x1, y1, x2 - x1, y2 - y1], area=float((x2 - x1) * (y2 - y1)) * 0.6,
                     keypoints=kp.ravel().tolist(),
                     num_keypoints=int((kp[:, 2] > 0).sum()),
                     segmentation=[[x1, y1, x2, y1, x2, y2, x1, y2]]))
  cat = dict(id=1, name="figure", keypoints=[f"p{j}" for j in range(k)], skeleton=[[1, 2]])
  if sigmas is not None:
    cat["sigmas"] = sigmas
  data = dict(images=[dict(id=1, width=100, height=100, file_name="1.png")], categories=[cat],
              annotations=anns)
  path = tmp_path / "kp.json"
  path.write_text(json.dumps(data))
  return path, data


def _keypoint_prediction(data, noise, rng):
  anns = data["annotations"]
  kp = np.array([a["keypoints"] for a in anns], np.float32).reshape(len(anns), -1, 3)
  kp[..., :2] += rng.normal(0, noise, kp[..., :2].shape)
  kp[..., 2] = 1
  boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
  return dict(boxes=boxes, scores=np.array([0.9, 0.8, 0.7], np.float32), labels=np.ones(3, int),
              keypoints=kp, keypoints_scores=np.ones(kp.shape[:2], np.float32))


@pytest.mark.parametrize("sigmas", [None, [0.05, 0.1, 0.08, 0.02]])
def test_keypoint_ap_equals_pycocotools(tmp_path, sigmas):
  """Noisy predicted points: the keypoints task equals COCOeval run by hand on torchvision-style
  keypoint records (no bbox) with the category's sigmas (else the documented default); the bbox
  task is unaffected by the keypoints."""
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  path, data = _keypoint_gt(tmp_path, sigmas)
  pred = _keypoint_prediction(data, 2.0, np.random.default_rng(1))
  records = coco_eval.to_coco_results(1, pred)
  assert all(len(r["keypoints"]) == 12 for r in records)
  summary = coco_eval.evaluate(path, records, iou_types=("bbox", "keypoints"), verbose=False)
  assert set(summary["keypoints"]) == set(coco_eval.KEYPOINT_STAT_NAMES) | {"per_category"}
  gt = COCO(str(path))
  dt = gt.loadRes([dict(image_id=1, category_id=1, keypoints=r["keypoints"], score=r["score"])
                   for r in records])
  ev = COCOeval(gt, dt, "keypoints")
  ev.params.kpt_oks_sigmas = np.array(sigmas or [coco_eval.DEFAULT_KEYPOINT_SIGMA] * 4)
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  names = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
  for name, v in zip(names, ev.stats):
    assert summary["keypoints"][name] == pytest.approx(v), name
  assert 0.0 < summary["keypoints"]["AP"] < 1.0  # the noise costs something
  assert summary["bbox"]["AP"] == pytest.approx(1.0)


def test_exact_keypoints_give_ap_one_and_coco_sigmas_for_17(tmp_path):
  path, data = _keypoint_gt(tmp_path, k=17)
  assert coco_eval.keypoint_sigmas(coco_eval._load_coco(path), 17) == coco_eval.COCO_PERSON_SIGMAS
  pred = _keypoint_prediction(data, 0.0, np.random.default_rng(0))
  summary = coco_eval.evaluate(path, coco_eval.to_coco_results(1, pred),
                               iou_types=("keypoints",), verbose=False)
  assert summary["keypoints"]["AP"] == pytest.approx(1.0)


def test_keypoint_count_mismatch_is_an_error(tmp_path):
  path, data = _keypoint_gt(tmp_path, [0.1] * 4)
  pred = _keypoint_prediction(data, 0.0, np.random.default_rng(0))
  pred["keypoints"] = pred["keypoints"][:, :3]
  with pytest.raises(ValueError, match="counts"):
    coco_eval.evaluate(path, coco_eval.to_coco_results(1, pred), iou_types=("keypoints",),
                       verbose=False)
