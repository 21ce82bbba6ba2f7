"""COCO box, mask and keypoint AP through pycocotools: results JSON, RLE masks, COCOeval
summaries."""
import contextlib
import io
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax import paths

# The numbers COCOeval.summarize() prints, in its order: 12 for bbox and segm, 10 for keypoints.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

# OKS sigmas of COCO's 17 person keypoints (pycocotools' default, in COCO's keypoint order).
COCO_PERSON_SIGMAS = (.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107,
                      .107, .087, .087, .089, .089)
# Other keypoint sets without their own `sigmas` (in the dataset's category): this for every
# point, about the mean of COCO's.
DEFAULT_KEYPOINT_SIGMA = 0.07


def encode_mask(mask: np.ndarray) -> Dict[str, Any]:
  """[H, W] bool/uint8 -> COCO compressed RLE with a str 'counts' (JSON-ready)."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def to_coco_results(image_id: int, result: Mapping[str, np.ndarray],
                    label_to_category: Optional[Mapping[int, int]] = None,
                    mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
  """One image's predictions -> COCO result records.

  Args:
    image_id: the COCO image id.
    result: `predict` output for the image: boxes [N, 4] (x1, y1, x2, y2) original pixels, scores
      [N], labels [N] (model class indices), optionally masks [N, H, W] probabilities or bools and
      mask_scores [N] (Mask Scoring R-CNN's rescored mask confidences), keypoints [N, K, 3] (x, y,
      v) original pixels.
    label_to_category: model class index -> COCO category id; None keeps labels as ids
      (torchvision's 91-way COCO models).
    mask_threshold: probabilities above it are foreground.

  Returns:
    [{'image_id', 'category_id', 'bbox' [x, y, w, h], 'score', ('segmentation' RLE), ('keypoints'
    [x1, y1, v1, ...])}], one record per detection; with mask_scores two: a bbox record ('bbox',
    the box score, keypoints) and a segm record ('segmentation', the mask score, no 'bbox'), as the
    COCO results of the two tasks (`task_records`).
  """
  boxes = np.asarray(result["boxes"], np.float64)
  out = []
  for i in range(len(result["scores"])):
    label = int(result["labels"][i])
    if label_to_category is not None:
      if label not in label_to_category:
        raise ValueError(f"label {label} has no COCO category (known: {sorted(label_to_category)})")
      cat = int(label_to_category[label])
    else:
      cat = label
    x1, y1, x2, y2 = boxes[i]
    rec = dict(image_id=int(image_id), category_id=cat,
               bbox=[round(float(x1), 3), round(float(y1), 3), round(float(x2 - x1), 3),
                     round(float(y2 - y1), 3)],
               score=round(float(result["scores"][i]), 5))
    if "keypoints" in result:  # scored with the box score, as torchvision's reference does
      rec["keypoints"] = [round(float(v), 3) for v in np.asarray(result["keypoints"][i]).ravel()]
    if "masks" in result:
      m = np.asarray(result["masks"][i])
      segmentation = encode_mask(m > mask_threshold if m.dtype != bool else m)
      if "mask_scores" in result:  # the box keeps its score, the mask gets its own record
        out.append(rec)
        rec = dict(image_id=int(image_id), category_id=cat, segmentation=segmentation,
                   score=round(float(result["mask_scores"][i]), 5))
      else:
        rec["segmentation"] = segmentation
    out.append(rec)
  return out


IOU_TYPES = ("bbox", "segm", "keypoints")


def check_tasks(tasks: Iterable[str]) -> None:
  """Raises ValueError unless every task (a model's `eval_tasks`) is one this module scores."""
  bad = [t for t in tasks if t not in IOU_TYPES]
  if bad:
    raise ValueError(f"COCO evaluation scores {IOU_TYPES}; the model's heads ask for {bad}")


def task_records(results: Sequence[Mapping[str, Any]], iou_type: str) -> List[Dict[str, Any]]:
  """The records COCOeval scores for one task: those with a 'bbox' for 'bbox', those with a
  'segmentation' for 'segm' (a Mask Scoring R-CNN's segm records carry the mask score and no
  'bbox'; pycocotools derives their boxes from the masks), and for 'keypoints' the 'keypoints'
  of those that have them, without bbox or mask (pycocotools then takes each detection's area
  from its points, as for torchvision's keypoint results)."""
  check_tasks([iou_type])
  if iou_type == "keypoints":
    keep = ("image_id", "category_id", "keypoints", "score")
    return [{k: r[k] for k in keep} for r in results if "keypoints" in r]
  key = "bbox" if iou_type == "bbox" else "segmentation"
  return [dict(r) for r in results if key in r]


def keypoint_sigmas(coco_gt: COCO, num_keypoints: int) -> Tuple[float, ...]:
  """The OKS sigmas to score `num_keypoints`-point keypoints against `coco_gt`: the `sigmas` of
  its category with keypoints (a maskrcnn_jax extension of the category record, e.g. the
  synthetic keypoint set's), else COCO's person sigmas for 17 points, else
  `DEFAULT_KEYPOINT_SIGMA` for every point."""
  for cat in coco_gt.dataset.get("categories", []):
    if cat.get("sigmas"):
      sigmas = tuple(float(v) for v in cat["sigmas"])
      if len(sigmas) != num_keypoints:
        raise ValueError(f"category {cat.get('name')!r} has {len(sigmas)} keypoint sigmas for "
                         f"{num_keypoints} keypoints")
      return sigmas
  if num_keypoints == len(COCO_PERSON_SIGMAS):
    return COCO_PERSON_SIGMAS
  return (DEFAULT_KEYPOINT_SIGMA,) * num_keypoints


def evaluate(gt: Any, results: Sequence[Mapping[str, Any]],
             iou_types: Iterable[str] = ("bbox", "segm"),
             image_ids: Optional[Sequence[int]] = None, verbose: bool = True) -> Dict[str, Any]:
  """Runs COCOeval for each IoU type.

  Args:
    gt: a `COCO` object or the path of an instances JSON.
    results: COCO result records (`to_coco_results`); may be empty. The segm evaluation scores
      them by their 'segm_score' where they have one (`task_records`).
    iou_types: 'bbox', 'segm' and/or 'keypoints' (OKS with `keypoint_sigmas(gt, K)`).
    image_ids: evaluate on these images only (default: all of gt's).
    verbose: print pycocotools' standard summaries and a per-category AP table.

  Returns:
    {iou_type: {'AP', 'AP50', ... (12 numbers; for keypoints the 10 of KEYPOINT_STAT_NAMES),
    'per_category': {name: AP}}}; AP values in [0, 1] (COCOeval's -1 for "no such objects" is kept
    as -1).
  """
  coco_gt = gt if isinstance(gt, COCO) else _load_coco(gt)
  if image_ids is None:
    image_ids = sorted(coco_gt.getImgIds())
  known = set(coco_gt.getImgIds())
  unknown = {r["image_id"] for r in results} - known
  if unknown:
    raise ValueError(f"{len(unknown)} result image ids are not in the ground truth, e.g. "
                     f"{sorted(unknown)[:5]}")
  iou_types = tuple(iou_types)
  check_tasks(iou_types)
  summary: Dict[str, Any] = {}
  for iou_type in iou_types:
    recs = task_records(results, iou_type)
    if iou_type in ("segm", "keypoints") and results and not recs:
      raise ValueError(f"{iou_type} evaluation needs results with "
                       f"{'segmentation (masks)' if iou_type == 'segm' else 'keypoints'}")
    coco_dt = _load_results(coco_gt, recs)
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    ev.params.imgIds = list(image_ids)
    names = STAT_NAMES
    if iou_type == "keypoints":
      names = KEYPOINT_STAT_NAMES
      ev.params.kpt_oks_sigmas = np.asarray(keypoint_sigmas(coco_gt, _num_keypoints(coco_gt,
                                                                                   recs)))
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
      ev.evaluate()
      ev.accumulate()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
      ev.summarize()
    stats = {name: float(v) for name, v in zip(names, ev.stats)}
    stats["per_category"] = _per_category_ap(ev, coco_gt)
    summary[iou_type] = stats
    if verbose:
      print(f"COCO {iou_type} ({len(image_ids)} images, {len(recs)} detections)")
      print(text.getvalue().rstrip())
      print("  per-category AP: " + ", ".join(
          f"{k} {v:.3f}" for k, v in stats["per_category"].items()))
  return summary


def _num_keypoints(coco_gt: COCO, recs: Sequence[Mapping[str, Any]]) -> int:
  """K of the ground truth's keypoints (checked against the results')."""
  counts = {len(a["keypoints"]) // 3 for a in coco_gt.dataset.get("annotations", [])
            if a.get("keypoints")}
  counts |= {len(r["keypoints"]) // 3 for r in recs}
  if len(counts) != 1:
    raise ValueError("keypoint evaluation needs ground truth with keypoints, all of one count K "
                     f"as the results'; found counts {sorted(counts)}")
  return counts.pop()


def _load_coco(path) -> COCO:
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(str(path))


def _load_results(coco_gt: COCO, recs: Sequence[Mapping[str, Any]]) -> COCO:
  """`coco_gt.loadRes` that also accepts an empty result list (pycocotools rejects it)."""
  if recs:
    with contextlib.redirect_stdout(io.StringIO()):
      return coco_gt.loadRes([dict(r) for r in recs])
  dt = COCO()
  dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                "annotations": []}
  with contextlib.redirect_stdout(io.StringIO()):
    dt.createIndex()
  return dt


def _per_category_ap(ev: COCOeval, coco_gt: COCO) -> Dict[str, float]:
  """AP@[.5:.95] per category from COCOeval's precision array (area all, 100 dets)."""
  precision = ev.eval["precision"]  # [T, R, K, A, M]
  out = {}
  for k, cat_id in enumerate(ev.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    name = coco_gt.cats[cat_id]["name"]
    out[name] = float(np.mean(p)) if p.size else -1.0
  return out


def save_results(path, records: Sequence[Mapping[str, Any]]) -> None:
  """Writes COCO result records as JSON (`path` local or a URL)."""
  paths.as_path(path).write_text(json.dumps(list(records)))
