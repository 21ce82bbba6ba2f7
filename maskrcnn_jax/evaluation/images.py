"""Predictions on image files (no ground truth): a picture per image and one predictions JSON.

    images, names, skipped = load_images(["photos/", "a.jpg"])
    records = export_predictions(model, variables, images, names, out_dir, class_names=...)
"""
import glob
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from maskrcnn_jax.evaluation.coco_eval import to_coco_results
from maskrcnn_jax.evaluation.inference import predict
from maskrcnn_jax.evaluation.visualize import draw_predictions
from maskrcnn_jax.paths import as_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_image_files(paths: Sequence[str]) -> List[str]:
  """Files among `paths`, and the image files (by suffix, sorted) in the folders among them."""
  files = []
  for p in paths:
    if os.path.isdir(p):
      files += sorted(f for f in glob.glob(os.path.join(p, "*"))
                      if f.lower().endswith(IMAGE_SUFFIXES))
    else:
      files.append(p)
  return files


def load_images(paths: Sequence[str]) -> Tuple[List[np.ndarray], List[str], List[str]]:
  """Decodes image files (or every image in folders) as [H, W, 3] uint8 RGB.

  Returns:
    (images, their file names, skipped: 'file: reason' for each file that failed to decode).

  Raises:
    ValueError: no image file was found, or none decoded.
  """
  from PIL import Image
  files = list_image_files(paths)
  if not files:
    raise ValueError(f"no image files found in {list(paths)}")
  images, names, skipped = [], [], []
  for f in files:
    try:
      with Image.open(f) as im:
        images.append(np.asarray(im.convert("RGB")))
      names.append(f)
    except (OSError, ValueError) as err:
      skipped.append(f"{f}: cannot decode it ({err})")
  if not images:
    raise ValueError("none of the images could be decoded: " + "; ".join(skipped))
  return images, names, skipped


def export_predictions(model, variables, images: Sequence[np.ndarray], names: Sequence[str],
                       out_dir: str, *, class_names: Optional[Sequence[str]] = None,
                       score_threshold: float = 0.5, mask_threshold: float = 0.5,
                       **predict_kwargs) -> List[Dict[str, Any]]:
  """Predicts on `images` and writes `<name>_pred.png` per image and `predictions.json`.

  Args:
    model, variables: the detector.
    images: [H, W, 3] uint8 RGB arrays; names: their file names (the pictures' stems).
    out_dir: the output folder (created).
    class_names: [background, ...] for the pictures' labels (default: class indices).
    score_threshold: pictures draw detections scoring at least this.
    mask_threshold: masks are RLE-encoded as `probability > mask_threshold`.
    predict_kwargs: `predict`'s min_size, max_size, bucket, batch_size.

  Returns:
    The records written to predictions.json: {file_name, image_id (index in `images`),
    category_id (model class), bbox [x, y, w, h] original pixels, score, and segmentation (RLE)
    when the model predicts masks}; with a MaskIoU head, each detection's box and mask are two
    records, the mask's with the mask score and no bbox (`coco_eval.to_coco_results`).
  """
  out = as_path(out_dir)  # a local folder or a URL (gs://...)
  out.mkdir(parents=True, exist_ok=True)
  results = predict(model, variables, list(images), **predict_kwargs)
  records = []
  for i, (image, name, res) in enumerate(zip(images, names, results)):
    records += [dict(file_name=name, **rec) for rec in
                to_coco_results(i, res, mask_threshold=mask_threshold)]
    pic = draw_predictions(image, res, class_names, score_threshold=score_threshold)
    with (out / (os.path.splitext(os.path.basename(name))[0] + "_pred.png")).open("wb") as f:
      pic.save(f, format="PNG")
  (out / "predictions.json").write_text(json.dumps(records))
  return records
