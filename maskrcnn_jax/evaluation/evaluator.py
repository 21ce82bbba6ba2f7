"""Evaluation of a model on a prepared dataset split: jitted bucketed inference, COCO results JSON,
COCOeval for every task the model predicts (bbox, and segm with a mask head), pictures. Used by
eval.py and by periodic evaluation during training.

The split is read by `data.read_examples` (the pipeline's reader) and every image goes through
`predict`'s torchvision-exact preprocessing; the ground truth is rebuilt from the same records."""
import json
from typing import Any, Dict, List, Optional

import numpy as np

from maskrcnn_jax import paths
from maskrcnn_jax.evaluation import coco_eval
from maskrcnn_jax.evaluation.inference import predict
from maskrcnn_jax.evaluation.visualize import draw_predictions


class SplitError(ValueError):
  """The split to evaluate does not exist or holds no decodable image."""


def load_label_map(builder):
  """(label_to_category {model class -> COCO category id}, class_names [background, ...])."""
  from maskrcnn_jax.data.builder import load_categories
  cats = load_categories(builder)
  label_to_category = {int(c["contiguous_id"]): int(c["category_id"]) for c in cats}
  names = ["background"] + [c["name"] for c in sorted(cats, key=lambda c: c["contiguous_id"])]
  return label_to_category, names


def _gt_records(ex) -> Dict[str, List[Dict[str, Any]]]:
  """COCO ground truth of one prepared example (boxes, masks as uncompressed RLE, crowd flags;
  keypoints and num_keypoints when the dataset has keypoints)."""
  h, w = (int(v) for v in ex["image/size"])
  img_id = int(ex["image/id"])
  obj = ex["objects"]
  counts = np.asarray(ex["mask_rle"])
  lengths = np.asarray(obj["mask_rle_length"])
  starts = np.concatenate([[0], np.cumsum(lengths)])
  anns = []
  for k in range(len(obj["id"])):
    x1, y1, x2, y2 = (float(v) for v in obj["bbox_xyxy"][k])
    anns.append(dict(id=int(obj["id"][k]), image_id=img_id, category_id=int(obj["category_id"][k]),
                     bbox=[x1, y1, x2 - x1, y2 - y1], area=float(obj["area"][k]),
                     iscrowd=int(bool(obj["is_crowd"][k])),
                     segmentation={"size": [h, w],
                                   "counts": counts[starts[k]:starts[k + 1]].tolist()}))
    if "keypoints" in obj:
      anns[-1].update(keypoints=np.asarray(obj["keypoints"][k], np.float64).ravel().tolist(),
                      num_keypoints=int(obj["num_keypoints"][k]))
  image = dict(id=img_id, height=h, width=w, file_name=ex["image/filename"].decode())
  return dict(image=image, annotations=anns)


def evaluate_split(model, variables, builder, split: str, *, min_size: int, max_size: int,
                   bucket: int = 128, batch_size: int = 1, max_images: Optional[int] = None,
                   out_dir: Optional[str] = None, num_pictures: int = 0,
                   label_to_category=None, class_names=None, verbose: bool = True,
                   gt_json: Optional[str] = None) -> Dict[str, Any]:
  """Predicts every image of a split and scores the predictions with COCOeval.

  Args:
    model, variables: the detector.
    builder: a prepared tfds builder (`data.prepare_coco_format`).
    split: e.g. 'validation'.
    min_size, max_size, bucket, batch_size: inference resize and bucketing (see `predict`).
    max_images: evaluate only the first N images.
    out_dir: where to write `results.json` (COCO results; with a MaskIoU head, bbox records with
      the box score and segm records with the mask score), `metrics.json` and pictures.
    num_pictures: how many images to draw (PNG) into `out_dir/pictures`.
    label_to_category, class_names: model class -> COCO category id, and names; default: the
      dataset's own table (`load_label_map`). For torchvision's 91-way COCO models pass an identity
      map.
    gt_json: score against this annotation file instead of the ground truth rebuilt from the split.

  Returns:
    {task: {...12 stats (10 for keypoints), per_category} for each of `model.eval_tasks` ('bbox',
    'segm' with a mask head, 'keypoints' with a keypoint head), 'num_images', 'skipped': [...]}.

  Raises:
    SplitError: an unknown or empty split, or one whose images all fail to decode.
    ValueError: the model predicts something COCO evaluation does not score (`model.eval_tasks`).
  """
  try:
    num = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as err:
    raise SplitError(f"split {split!r} is not in the dataset (splits: "
                     f"{sorted(builder.info.splits)}): {err}") from None
  if num == 0:
    raise SplitError(f"split {split!r} has no images to evaluate")
  coco_eval.check_tasks(model.eval_tasks)
  if label_to_category is None or class_names is None:
    l2c, names = load_label_map(builder)
    label_to_category = label_to_category if label_to_category is not None else l2c
    class_names = class_names if class_names is not None else names
  keypoints = None
  if "keypoints" in model.eval_tasks:
    from maskrcnn_jax.data.builder import load_keypoint_info
    keypoints = load_keypoint_info(builder)
  skeleton = keypoints["skeleton"] if keypoints else None
  images_meta, anns, records, skipped = [], [], [], []
  pending: List[Any] = []
  pictures = []

  def flush():
    if not pending:
      return
    results = predict(model, variables, [p[0] for p in pending], min_size=min_size,
                      max_size=max_size, bucket=bucket, batch_size=batch_size)
    for (image, img_id), res in zip(pending, results):
      records.extend(coco_eval.to_coco_results(img_id, res, label_to_category))
      if len(pictures) < num_pictures:
        pictures.append((img_id, draw_predictions(image, res, class_names, skeleton=skeleton)))
    pending.clear()

  from maskrcnn_jax.data.pipeline import read_examples  # TensorFlow: only when reading a split
  for image, ex, error in read_examples(builder, split, max_images):
    if error is not None:
      skipped.append(error)
      print(f"evaluation: skipped an image that failed to decode: {error}")
      continue
    gt = _gt_records(ex)
    images_meta.append(gt["image"])
    anns.extend(gt["annotations"])
    pending.append((image, gt["image"]["id"]))
    if len(pending) == batch_size * 8:
      flush()
  flush()
  if not images_meta:
    raise SplitError(f"split {split!r} has no images to evaluate"
                     + (f" ({len(skipped)} failed to decode)" if skipped else ""))
  if gt_json is None:
    from pycocotools.coco import COCO
    cats = [dict(id=int(c), name=class_names[k]) for k, c in sorted(label_to_category.items())]
    for cat, k in zip(cats, sorted(label_to_category)):
      if keypoints and k in keypoints["contiguous_ids"]:  # what COCOeval's OKS reads (sigmas)
        cat.update(keypoints=keypoints["names"], skeleton=keypoints["skeleton"])
        if keypoints["sigmas"]:
          cat["sigmas"] = keypoints["sigmas"]
    gt = COCO()
    gt.dataset = dict(images=images_meta, annotations=anns, categories=cats)
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
      gt.createIndex()
  else:
    gt = gt_json
  summary = coco_eval.evaluate(gt, records, iou_types=model.eval_tasks,
                               image_ids=[m["id"] for m in images_meta], verbose=verbose)
  summary["num_images"] = len(images_meta)
  summary["skipped"] = skipped
  if out_dir:  # a local folder or a URL (gs://...)
    paths.as_path(out_dir).mkdir(parents=True, exist_ok=True)
    coco_eval.save_results(paths.join(out_dir, "results.json"), records)
    # Whole or absent, even if interrupted.
    paths.write_text_atomic(paths.join(out_dir, "metrics.json"), json.dumps(summary, indent=1))
    if pictures:
      pic_dir = paths.as_path(out_dir) / "pictures"
      pic_dir.mkdir(parents=True, exist_ok=True)
      for img_id, pil in pictures:
        with (pic_dir / f"{img_id}.png").open("wb") as f:
          pil.save(f, format="PNG")
  return summary


def make_training_evaluator(config, max_images: Optional[int] = None, num_pictures: int = 4):
  """The `evaluate` callback of `training.trainer.train_and_evaluate`: the same evaluation as
  eval.py on `config.data.eval_split`, written to WORKDIR/eval/step_<N>; returns AP figures."""
  from maskrcnn_jax.modeling.builder import build_model
  coco_eval.check_tasks(build_model(config.model).eval_tasks)  # before training, not after
  inp = config.input
  split = config.data.get("eval_split", "validation")

  def evaluate(step, model, variables, builder, workdir):
    import jax
    if jax.process_index() != 0:
      return {}
    summary = evaluate_split(model, jax.device_get(variables), builder, split,
                             min_size=int(inp.min_size), max_size=int(inp.max_size),
                             bucket=int(inp.bucket), batch_size=int(inp.batch_size),
                             max_images=max_images, num_pictures=num_pictures, verbose=False,
                             out_dir=paths.join(workdir, "eval", f"step_{step}"))
    return headline_metrics(summary)
  return evaluate


def headline_metrics(summary: Dict[str, Any]) -> Dict[str, float]:
  """{'<task>/AP', '<task>/AP50', '<task>/AP75'} of every evaluated task, for logs and
  TensorBoard."""
  return {f"{task}/{k}": float(stats[k]) for task, stats in summary.items()
          if isinstance(stats, dict) for k in ("AP", "AP50", "AP75")}
