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
