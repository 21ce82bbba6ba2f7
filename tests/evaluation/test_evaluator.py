"""evaluate_split on a prepared shapes split: the ground truth rebuilt from tfds, label mapping,
results JSON and pictures, and the error cases."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from configs import tiny
from maskrcnn_jax.data import generate_shapes, prepare_coco_format
from maskrcnn_jax.evaluation import evaluator, inference
from maskrcnn_jax.modeling import build_model
from tests.conftest import quick_variables


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  generate_shapes(str(root / "src"), num_train=2, num_val=6, seed=3, image_size=96)
  builder = prepare_coco_format(str(root / "src"), str(root / "tfds"))
  ann = json.loads((root / "src" / "annotations" / "instances_val.json").read_text())
  return builder, ann


def _rle(seg, h, w):
  if isinstance(seg, list):
    return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
  if isinstance(seg["counts"], str):
    return {"size": seg["size"], "counts": seg["counts"].encode()}
  return mask_utils.frPyObjects(seg, h, w)


def _perfect_predict(ann, masks=True):
  """A stand-in for `predict` that returns the JSON's own objects (labels = contiguous ids), with
  their masks unless `masks` is False (a Faster R-CNN model's results)."""
  cats = sorted(c["id"] for c in ann["categories"])
  by_size = {}
  for im in ann["images"]:
    by_size.setdefault((im["height"], im["width"]), []).append(im["id"])
  anns = {}
  for a in ann["annotations"]:
    anns.setdefault(a["image_id"], []).append(a)

  def fake(model, variables, images, **kw):
    out = []
    for image in images:
      # images arrive in the split's order, recorded by the test
      img_id = fake.order.pop(0)
      objs = [a for a in anns.get(img_id, []) if not a["iscrowd"]]
      h, w = image.shape[:2]
      res = dict(
          boxes=np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in objs], np.float32).reshape(-1, 4),
          scores=np.ones(len(objs), np.float32),
          labels=np.array([cats.index(a["category_id"]) + 1 for a in objs]))
      if masks:
        res["masks"] = np.array([mask_utils.decode(_rle(a["segmentation"], h, w)) for a in objs],
                                np.float32).reshape(-1, h, w)
      out.append(res)
    return out
  return fake


@pytest.mark.parametrize("mask_on", [True, False])
def test_perfect_predictions_score_one_through_the_split(shapes, monkeypatch, tmp_path, mask_on):
  """Every task the model predicts is scored (bbox, and segm with a mask head); a Faster R-CNN
  model's metrics.json holds bbox only."""
  builder, ann = shapes
  import tensorflow_datasets as tfds
  order = [int(ex["image/id"]) for ex in tfds.as_numpy(builder.as_dataset(
      split="validation", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}))]
  fake = _perfect_predict(ann, masks=mask_on)
  fake.order = list(order)
  monkeypatch.setattr(evaluator, "predict", fake)
  cfg = tiny.get_config()
  cfg.model.mask_on = mask_on
  model = build_model(cfg.model)
  summary = evaluator.evaluate_split(model, None, builder, "validation", min_size=96,
                                     max_size=96, out_dir=str(tmp_path), num_pictures=2,
                                     verbose=False)
  assert summary["num_images"] == 6
  tasks = ("bbox", "segm") if mask_on else ("bbox",)
  assert sorted(k for k, v in summary.items() if isinstance(v, dict)) == sorted(tasks)
  for iou_type in tasks:
    assert summary[iou_type]["AP"] == pytest.approx(1.0), summary[iou_type]
  records = json.loads((tmp_path / "results.json").read_text())
  assert {r["category_id"] for r in records} <= {c["id"] for c in ann["categories"]}
  assert all(("segmentation" in r) == mask_on for r in records)
  assert len(list((tmp_path / "pictures").glob("*.png"))) == 2
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert sorted(k for k, v in metrics.items() if isinstance(v, dict)) == sorted(tasks)
  assert metrics["bbox"]["AP"] == pytest.approx(1.0)


@pytest.mark.slow
def test_real_model_runs_without_recompiling_per_image(shapes):
  builder, _ = shapes
  cfg = tiny.get_config()
  model = build_model(cfg.model)
  variables = quick_variables(model)
  before = inference.TRACE_COUNTS["forward"]
  summary = evaluator.evaluate_split(model, variables, builder, "validation", min_size=96,
                                     max_size=96, batch_size=2, verbose=False)
  assert inference.TRACE_COUNTS["forward"] - before <= 1
  assert summary["num_images"] == 6 and {"bbox", "segm"} <= set(summary)


def test_empty_split_is_a_clear_error(shapes):
  builder, _ = shapes
  with pytest.raises(ValueError, match="no images"):
    evaluator.evaluate_split(None, None, builder, "validation[:0]", min_size=96, max_size=96,
                             verbose=False)
  with pytest.raises(ValueError, match="not in the dataset"):
    evaluator.evaluate_split(None, None, builder, "test", min_size=96, max_size=96, verbose=False)
