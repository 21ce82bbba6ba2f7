"""Reading COCO-format folders into clean per-image examples (numpy, PIL, pycocotools; no TF).

This is the part of the tfds builder that touches files: it parses an annotation JSON, opens each
image, turns every annotation into a full-image mask exactly as pycocotools' `COCO.annToMask` does,
and counts everything it has to skip or fix. `builder.py` wraps it into a tfds
`GeneratorBasedBuilder`.

Bad data is never dropped silently. Each case below is counted in a `SplitReport` (printed and saved
as `skip_report.json` next to the prepared dataset):

  case                                              what happens (counter)
  image file missing                                image skipped (missing_image)
  image file unreadable / truncated                 image skipped (unreadable_image)
  image size differs from the JSON's width/height   image skipped (size_mismatch)
  duplicate image id                                later entry skipped (duplicate_image_id)
  grayscale / RGBA / CMYK / palette / 16-bit image  converted to RGB as PIL converts (alpha
                                                    dropped; 16-bit scaled by 1/257 when above
                                                    255), stored as PNG (converted_<mode>)
  annotation for an unknown image id                annotation skipped (unknown_image)
  annotation with an unknown category id            annotation skipped (unknown_category)
  polygon with < 3 points, odd length, non-finite   polygon dropped (degenerate_polygon); the
                                                    annotation skipped if none is left
                                                    (empty_segmentation)
  RLE whose `size` is not the image's (h, w)        annotation skipped (rle_size_mismatch)
  missing or malformed segmentation                 annotation skipped (missing_segmentation)
  segmentation that rasterizes to no pixel          annotation skipped (empty_mask)
  bbox missing                                      computed from the mask (bbox_from_mask)
  bbox malformed / width or height <= 0             annotation skipped (zero_area_box)
  bbox partly outside the image                     clipped to the image (clipped_box)
  bbox entirely outside the image                   annotation skipped (box_outside_image)
  image with no (remaining) annotation              kept (images_without_annotations): evaluation
                                                    needs it; the training pipeline skips it
                                                    unless asked

Keypoints (only when a category has a non-empty `keypoints` list of names; see `read_categories`):

  keypoints missing, not 3K numbers, non-numeric,   that object's keypoints all set to
  non-finite, or a v not in {0, 1, 2}               (0, 0, 0), the object kept (bad_keypoints)
  labelled point (v > 0) outside [0, W] x [0, H]    that point set to (0, 0, 0)
                                                    (keypoint_outside_image, counted per point)
  point with v = 0 and (x, y) != (0, 0)             stored as (0, 0, 0), not counted (COCO's
                                                    convention)
  object of a category without keypoints            all-zero keypoints, not counted

Bad keypoint records are fixes (the `fixed` table), not skips: the object's box and mask stay.

Masks are stored as uncompressed COCO RLE: the run lengths of the full-image mask read in
column-major (Fortran) order, starting with a run of zeros (possibly of length 0). `decode_rle`
inverts it.
"""
import collections
import dataclasses
import io
import json
import math
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# Skip reasons at image level and at annotation level (see the module docstring).
IMAGE_SKIPS = ("missing_image", "unreadable_image", "size_mismatch", "duplicate_image_id")
ANNOTATION_SKIPS = ("unknown_image", "unknown_category", "empty_segmentation", "rle_size_mismatch",
                    "missing_segmentation", "empty_mask", "zero_area_box", "box_outside_image")
FIXES = ("degenerate_polygon", "bbox_from_mask", "clipped_box", "bad_keypoints",
         "keypoint_outside_image")
_MAX_EXAMPLES_PER_REASON = 20


@dataclasses.dataclass
class SplitReport:
  """What happened to one split's images and annotations."""
  split: str = ""
  annotation_file: str = ""
  image_dir: str = ""
  images_in_json: int = 0
  images_written: int = 0
  annotations_in_json: int = 0
  annotations_written: int = 0
  crowd_annotations_written: int = 0
  images_without_annotations: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)      # reason -> count
  fixed: dict = dataclasses.field(default_factory=dict)        # reason -> count
  converted: dict = dataclasses.field(default_factory=dict)    # "converted_<mode>" -> count
  examples: dict = dataclasses.field(default_factory=dict)     # reason -> first few ids / names

  def count(self, table, reason, example=None, n=1):
    table[reason] = table.get(reason, 0) + n
    if example is not None:
      ex = self.examples.setdefault(reason, [])
      if len(ex) < _MAX_EXAMPLES_PER_REASON:
        ex.append(example)

  def merge(self, other):
    """Adds the counts of a per-image report (`other`) into this one."""
    for name in ("images_written", "annotations_written", "crowd_annotations_written",
                 "images_without_annotations"):
      setattr(self, name, getattr(self, name) + getattr(other, name))
    for table in ("skipped", "fixed", "converted"):
      for k, v in getattr(other, table).items():
        getattr(self, table)[k] = getattr(self, table).get(k, 0) + v
    for k, v in other.examples.items():
      ex = self.examples.setdefault(k, [])
      ex.extend(v[:max(0, _MAX_EXAMPLES_PER_REASON - len(ex))])

  def to_dict(self):
    return dataclasses.asdict(self)

  def summary(self):
    """A few human-readable lines."""
    lines = [f"[{self.split}] {self.annotation_file}",
             f"  images: {self.images_written} written of {self.images_in_json} in the JSON "
             f"({self.images_without_annotations} without annotations, kept)",
             f"  annotations: {self.annotations_written} written "
             f"({self.crowd_annotations_written} crowd) of {self.annotations_in_json} in the JSON"]
    for title, table in (("skipped", self.skipped), ("fixed", self.fixed),
                         ("converted to RGB", self.converted)):
      if table:
        items = ", ".join(f"{k}={v}" for k, v in sorted(table.items()))
        lines.append(f"  {title}: {items}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Category:
  """One category. `label` is the contiguous 0-based index (tfds ClassLabel); the model's class
  index is `label + 1` (0 is background). `keypoints` (K names), `skeleton` (1-based index pairs,
  as COCO writes them) and `sigmas` (K OKS sigmas, a non-standard field) are empty for categories
  without keypoints."""
  label: int
  category_id: int
  name: str
  supercategory: str = ""
  keypoints: tuple = ()
  skeleton: tuple = ()
  sigmas: tuple = ()

  def to_dict(self):
    """The fields as a dict; the keypoint fields only when they are set."""
    d = {"label": self.label, "category_id": self.category_id, "name": self.name,
         "supercategory": self.supercategory}
    if self.keypoints:
      d["keypoints"] = list(self.keypoints)
      d["skeleton"] = [list(p) for p in self.skeleton]
      if self.sigmas:
        d["sigmas"] = list(self.sigmas)
    return d


def load_annotations(annotation_file):
  """Parses a COCO-format annotation JSON; ValueError if it is not one."""
  with open(annotation_file, "rb") as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{annotation_file}: top level is not a JSON object")
  for key in ("images", "categories"):
    if not isinstance(data.get(key), list):
      raise ValueError(f"{annotation_file}: missing or malformed '{key}' list")
  data.setdefault("annotations", [])
  if not isinstance(data["annotations"], list):
    raise ValueError(f"{annotation_file}: 'annotations' is not a list")
  return data


def _is_number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_keypoint_fields(cat):
  """(names, skeleton, sigmas) tuples of one JSON category; ValueError when malformed."""
  names = cat.get("keypoints") or []
  if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"category {cat.get('id')}: 'keypoints' must be a list of names, got "
                     f"{names!r}")
  if len(set(names)) != len(names):
    raise ValueError(f"category {cat.get('id')}: repeated keypoint names {names}")
  k = len(names)
  skeleton = (cat.get("skeleton") or []) if k else []
  if not isinstance(skeleton, list) or not all(
      isinstance(p, (list, tuple)) and len(p) == 2 and
      all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= k for i in p)
      for p in skeleton):
    raise ValueError(f"category {cat.get('id')}: 'skeleton' must be a list of 1-based pairs of "
                     f"keypoint indices in [1, {k}], got {skeleton!r}")
  sigmas = cat.get("sigmas") if k else None
  if sigmas is not None:
    if (not isinstance(sigmas, list) or len(sigmas) != k or
        not all(_is_number(v) and v > 0 for v in sigmas)):
      raise ValueError(f"category {cat.get('id')}: 'sigmas' must be {k} positive numbers (one "
                       f"per keypoint), got {sigmas!r}")
  return (tuple(names), tuple(tuple(int(i) for i in p) for p in skeleton),
          tuple(float(v) for v in sigmas or ()))


def _merge_field(what, cid, old, new):
  """Two files' values of one keypoint field: empty means 'not given'; given ones must agree."""
  if old and new and old != new:
    raise ValueError(f"category {cid}: {what} {list(old)} in one split and {list(new)} in "
                     "another")
  return old or new


def read_categories(datas):
  """Union of the categories of several parsed JSONs, sorted by category id.

  Args:
    datas: parsed annotation JSONs (e.g. one per split).

  Returns:
    list of `Category`, `label` = position in the list. Names are made unique (a repeated name gets
    `_<category_id>` appended) because tfds ClassLabel needs unique names. Categories with a
    non-empty `keypoints` list carry it, with `skeleton` ([] if absent) and `sigmas` (if given).

  Raises:
    ValueError: a category id with different names (or keypoint names, skeletons, sigmas) in
      different files, malformed keypoint fields, categories with keypoints whose names, skeletons
      or sigmas differ from each other, or no categories at all.
  """
  by_id = {}
  for data in datas:
    for cat in data["categories"]:
      if not isinstance(cat, dict):
        raise ValueError(f"malformed category entry: {cat!r}")
      try:
        cid = int(cat["id"])
      except (KeyError, TypeError, ValueError):
        raise ValueError(f"malformed category entry: {cat!r}") from None
      name = str(cat.get("name", cid))
      if cid in by_id and by_id[cid][0] != name:
        raise ValueError(f"category id {cid} is named {by_id[cid][0]!r} in one split and {name!r} "
                         "in another")
      kp = _parse_keypoint_fields(cat)
      if cid in by_id:
        kp = tuple(_merge_field(what, cid, old, new) for what, old, new in
                   zip(("keypoint names", "skeleton", "sigmas"), by_id[cid][2], kp))
      by_id[cid] = (name, str(cat.get("supercategory", "")), kp)
  if not by_id:
    raise ValueError("no categories in the annotation files")
  with_kp = {cid: v[2] for cid, v in by_id.items() if v[2][0]}
  for i, what in enumerate(("keypoint names", "skeleton", "sigmas")):
    given = {cid: kp[i] for cid, kp in with_kp.items() if kp[i]}   # names are never empty here
    if len(set(given.values())) > 1:
      raise ValueError("all categories with keypoints must have the same " + what + "; got " +
                       "; ".join(f"category {cid}: {list(v)}" for cid, v in sorted(given.items())))
  names = collections.Counter(name for name, _, _ in by_id.values())
  cats = []
  for label, cid in enumerate(sorted(by_id)):
    name, sup, (kp_names, skeleton, sigmas) = by_id[cid]
    if names[name] > 1:
      name = f"{name}_{cid}"
    cats.append(Category(label=label, category_id=cid, name=name, supercategory=sup,
                         keypoints=kp_names, skeleton=skeleton, sigmas=sigmas))
  return cats


def keypoint_names(categories):
  """The keypoint names shared by the categories that have keypoints; () when none has."""
  for c in categories:
    if c.keypoints:
      return tuple(c.keypoints)
  return ()


def encode_rle(mask):
  """Uncompressed COCO RLE counts of a binary mask.

  Args:
    mask: [H, W] binary (any dtype).

  Returns:
    [R] int32 run lengths over the mask in column-major order, starting with a (possibly empty) run
    of zeros; they sum to H * W.
  """
  flat = np.asarray(mask, dtype=bool).ravel(order="F")
  if flat.size == 0:
    return np.zeros((1,), np.int32)
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds)
  if flat[0]:
    runs = np.concatenate([[0], runs])
  return runs.astype(np.int32)


def decode_rle(counts, height, width):
  """Inverse of `encode_rle`: [R] run lengths -> [height, width] uint8 mask in {0, 1}."""
  counts = np.asarray(counts, dtype=np.int64)
  values = (np.arange(counts.size) % 2).astype(np.uint8)
  flat = np.repeat(values, counts)
  if flat.size != height * width:
    raise ValueError(f"RLE counts sum to {flat.size}, expected {height} * {width}")
  return flat.reshape(width, height).T.copy()


def _valid_polygon(poly):
  if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
    return False
  try:
    arr = np.asarray(poly, dtype=np.float64)
  except (TypeError, ValueError):
    return False
  return arr.ndim == 1 and bool(np.all(np.isfinite(arr)))


def annotation_mask(segmentation, height, width, report=None, ann_id=None):
  """Full-image mask of a COCO segmentation, as `COCO.annToMask` computes it.

  Polygons go through `frPyObjects` + `merge`, uncompressed RLE through `frPyObjects`, compressed
  RLE is decoded as is. Degenerate polygons are dropped first (and counted in `report`).

  Returns:
    ([height, width] uint8 mask, None) or (None, skip_reason).
  """
  if isinstance(segmentation, list):
    polys = [p for p in segmentation if _valid_polygon(p)]
    if report is not None and len(polys) != len(segmentation):
      report.count(report.fixed, "degenerate_polygon", ann_id, len(segmentation) - len(polys))
    if not polys:
      return None, "empty_segmentation"
    polys = [[float(v) for v in p] for p in polys]
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
  elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    try:
      size = [int(s) for s in segmentation["size"]]
    except (TypeError, ValueError):
      return None, "missing_segmentation"
    if size != [height, width]:
      return None, "rle_size_mismatch"
    counts = segmentation["counts"]
    try:
      if isinstance(counts, list):
        if sum(int(c) for c in counts) != height * width or any(int(c) < 0 for c in counts):
          return None, "rle_size_mismatch"
        rle = mask_utils.frPyObjects(segmentation, height, width)
      elif isinstance(counts, (str, bytes)):
        if isinstance(counts, str):
          counts = counts.encode("ascii")
        rle = {"size": size, "counts": counts}
      else:
        return None, "missing_segmentation"
      mask = mask_utils.decode(rle)
    except Exception:  # pycocotools raises plain Exceptions on corrupt strings.
      return None, "missing_segmentation"
    return mask, None
  else:
    return None, "missing_segmentation"
  return mask_utils.decode(rle), None


def mask_bbox_xyxy(mask):
  """Tight box (x1, y1, x2, y2), pixel edges, of a non-empty [H, W] mask."""
  ys = np.flatnonzero(mask.any(axis=1))
  xs = np.flatnonzero(mask.any(axis=0))
  return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)


def annotation_keypoints(ann, num_keypoints, height, width, report=None):
  """One annotation's keypoints, checked against the image (see the module docstring's table).

  Args:
    ann: the COCO annotation (its `keypoints` [3K] flat list (x, y, v), `num_keypoints`).
    num_keypoints: K.
    height, width: image size in pixels.
    report: a `SplitReport` that counts bad_keypoints / keypoint_outside_image fixes.

  Returns:
    keypoints: [K, 3] float32 (x, y, v) pixels, v in {0, 1, 2}; points with v = 0 are (0, 0, 0).
    num_labelled: int, the JSON's `num_keypoints` when it is a non-negative int and no point had
      to be removed; otherwise the number of points with v > 0 that are kept.
  """
  k = int(num_keypoints)
  ann_id = ann.get("id")
  raw = ann.get("keypoints")
  ok = (isinstance(raw, (list, tuple)) and len(raw) == 3 * k and all(_is_number(v) for v in raw))
  if ok:
    kps = np.asarray(raw, np.float64).reshape(k, 3)
    ok = bool(np.all(np.isin(kps[:, 2], (0.0, 1.0, 2.0))))
  if not ok:
    if report is not None:
      report.count(report.fixed, "bad_keypoints", ann_id)
    return np.zeros((k, 3), np.float32), 0
  labelled = kps[:, 2] > 0
  inside = ((kps[:, 0] >= 0) & (kps[:, 0] <= width) & (kps[:, 1] >= 0) &
            (kps[:, 1] <= height))
  outside = labelled & ~inside
  if outside.any() and report is not None:
    report.count(report.fixed, "keypoint_outside_image", ann_id, int(outside.sum()))
  kps[~labelled | outside] = 0.0
  num = ann.get("num_keypoints")
  if (outside.any() or not isinstance(num, int) or isinstance(num, bool) or num < 0):
    num = int(np.count_nonzero(kps[:, 2] > 0))
  return kps.astype(np.float32), int(num)


def _read_image(path, width, height, report, image_id):
  """Returns (encoded bytes, (h, w)) or None after counting a skip."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    report.count(report.skipped, "missing_image", path)
    return None
  except OSError:
    report.count(report.skipped, "unreadable_image", path)
    return None
  try:
    img = Image.open(io.BytesIO(raw))
    img.load()  # Fully decodes: a truncated file fails here, not later inside tf.data.
  except Exception:  # PIL raises many types for broken files.
    report.count(report.skipped, "unreadable_image", path)
    return None
  w, h = img.size
  if (width is not None and int(width) != w) or (height is not None and int(height) != h):
    report.count(report.skipped, "size_mismatch", f"{path}: json {width}x{height}, file {w}x{h}")
    return None
  if img.format in ("JPEG", "PNG") and img.mode == "RGB":
    return raw, (h, w)
  # Anything else (L, LA, RGBA, CMYK, P, I;16, other formats) is converted the way PIL converts it
  # (alpha dropped, not blended) and stored losslessly as PNG.
  report.count(report.converted, f"converted_{img.mode}", image_id)
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(img, dtype=np.float64)
    arr = np.clip(arr / (257.0 if arr.max() > 255 else 1.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
  rgb = img.convert("RGB")
  buf = io.BytesIO()
  rgb.save(buf, format="PNG", compress_level=1)
  return buf.getvalue(), (h, w)


def make_example(image, annotations, image_dir, cat_label, report, num_keypoints=0,
                 keypoint_category_ids=()):
  """Builds one image's example (a dict for the tfds features) or returns None if it is skipped.

  Args:
    image: the COCO `images` entry.
    annotations: the COCO `annotations` entries of this image (known categories only).
    image_dir: folder holding `image['file_name']`.
    cat_label: {category_id: contiguous 0-based label}.
    report: a `SplitReport` that receives the counts.
    num_keypoints: K; 0 for a dataset without keypoints (no keypoint entries at all).
    keypoint_category_ids: the category ids that have keypoints (the others get all zeros).

  Returns:
    dict with keys image, image/id, image/filename, image/size, objects (dict of lists; with
    K > 0 also keypoints [K, 3] float32 and num_keypoints int per object), mask_rle (flat int32
    counts), or None.
  """
  image_id = int(image["id"])
  file_name = str(image.get("file_name", ""))
  path = os.path.join(image_dir, file_name)
  read = _read_image(path, image.get("width"), image.get("height"), report, image_id)
  if read is None:
    return None
  encoded, (h, w) = read
  objects = {k: [] for k in ("id", "bbox_xyxy", "label", "category_id", "is_crowd", "area",
                             "mask_rle_length")}
  if num_keypoints:
    objects.update(keypoints=[], num_keypoints=[])
  rles = []
  for ann in annotations:
    ann_id = ann.get("id")
    mask, reason = annotation_mask(ann.get("segmentation"), h, w, report, ann_id)
    if mask is not None and not mask.any():
      mask, reason = None, "empty_mask"
    if mask is None:
      report.count(report.skipped, reason, ann_id)
      continue
    bbox = ann.get("bbox")
    if bbox is None:
      box = mask_bbox_xyxy(mask)
      report.count(report.fixed, "bbox_from_mask", ann_id)
    else:
      try:
        x, y, bw, bh = (float(v) for v in bbox)
      except (TypeError, ValueError):
        report.count(report.skipped, "zero_area_box", ann_id)
        continue
      if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
        report.count(report.skipped, "zero_area_box", ann_id)
        continue
      box = np.array([x, y, x + bw, y + bh], np.float64)
      clipped = np.clip(box, 0, [w, h, w, h])
      if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        report.count(report.skipped, "box_outside_image", ann_id)
        continue
      if not np.array_equal(clipped, box):
        report.count(report.fixed, "clipped_box", ann_id)
      box = clipped.astype(np.float32)
    is_crowd = bool(ann.get("iscrowd", 0))
    counts = encode_rle(mask)
    rles.append(counts)
    objects["id"].append(int(ann_id) if ann_id is not None else -1)
    objects["bbox_xyxy"].append(box)
    objects["label"].append(cat_label[int(ann["category_id"])])
    objects["category_id"].append(int(ann["category_id"]))
    objects["is_crowd"].append(is_crowd)
    objects["area"].append(float(ann.get("area", mask.sum())))
    objects["mask_rle_length"].append(counts.size)
    if num_keypoints:
      if int(ann["category_id"]) in keypoint_category_ids:
        kps, num = annotation_keypoints(ann, num_keypoints, h, w, report)
      else:
        kps, num = np.zeros((num_keypoints, 3), np.float32), 0
      objects["keypoints"].append(kps)
      objects["num_keypoints"].append(num)
    report.annotations_written += 1
    report.crowd_annotations_written += int(is_crowd)
  if not objects["id"]:
    report.images_without_annotations += 1
  report.images_written += 1
  return {
      "image": encoded,
      "image/id": image_id,
      "image/filename": file_name,
      "image/size": np.array([h, w], np.int32),
      "objects": objects,
      "mask_rle": np.concatenate(rles).astype(np.int32) if rles else np.zeros((0,), np.int32),
  }


def group_annotations(data, cat_label, report):
  """Checks image ids and groups annotations by image.

  Returns:
    images: list of unique `images` entries in JSON order.
    anns_by_image: {image_id: [annotation, ...]} with known images and categories only.
  """
  images, seen = [], set()
  for img in data["images"]:
    try:
      image_id = int(img["id"])
    except (KeyError, TypeError, ValueError):
      report.count(report.skipped, "unreadable_image", repr(img)[:200])
      continue
    if image_id in seen:
      report.count(report.skipped, "duplicate_image_id", image_id)
      continue
    seen.add(image_id)
    images.append(img)
  anns_by_image = collections.defaultdict(list)
  for ann in data["annotations"]:
    if not isinstance(ann, dict):
      report.count(report.skipped, "missing_segmentation", repr(ann)[:200])
      continue
    try:
      image_id = int(ann.get("image_id"))
    except (TypeError, ValueError):
      image_id = None
    if image_id not in seen:
      report.count(report.skipped, "unknown_image", ann.get("id"))
      continue
    try:
      cid = int(ann.get("category_id"))
    except (TypeError, ValueError):
      cid = None
    if cid not in cat_label:
      report.count(report.skipped, "unknown_category", ann.get("id"))
      continue
    anns_by_image[image_id].append(ann)
  return images, anns_by_image


def _make_example_job(args):
  image, anns, image_dir, cat_label, split, num_keypoints, kp_ids = args
  report = SplitReport(split=split)
  return make_example(image, anns, image_dir, cat_label, report, num_keypoints, kp_ids), report


def iter_examples(data, image_dir, categories, report, num_workers=1):
  """Yields (image_id, example) for every readable image of a parsed COCO JSON.

  Args:
    data: parsed annotation JSON (`load_annotations`).
    image_dir: folder of the images.
    categories: list of `Category` (`read_categories`); when some have keypoints, every example's
      objects carry keypoints [K, 3] and num_keypoints (see `make_example`).
    report: `SplitReport` filled in as the generator runs (complete once it is exhausted).
    num_workers: > 1 reads images and rasterizes masks in that many processes.
  """
  cat_label = {c.category_id: c.label for c in categories}
  num_keypoints = len(keypoint_names(categories))
  kp_ids = frozenset(c.category_id for c in categories if c.keypoints)
  report.images_in_json = len(data["images"])
  report.annotations_in_json = len(data["annotations"])
  images, anns_by_image = group_annotations(data, cat_label, report)
  jobs = ((img, anns_by_image.get(int(img["id"]), []), image_dir, cat_label, report.split,
           num_keypoints, kp_ids) for img in images)
  if num_workers and num_workers > 1:
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers) as pool:
      for example, sub in pool.imap(_make_example_job, jobs, chunksize=16):
        report.merge(sub)
        if example is not None:
          yield example["image/id"], example
  else:
    for job in jobs:
      example = make_example(job[0], job[1], image_dir, cat_label, report, num_keypoints, kp_ids)
      if example is not None:
        yield example["image/id"], example
