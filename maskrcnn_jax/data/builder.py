"""A tfds builder for COCO-format instance segmentation (and keypoint) folders (COCO 2017 or any
custom folder).

tfds's `coco/2017` has boxes only; this builder keeps the instance masks. Use it through
`prepare_coco_format`, which derives a builder config from the inputs (so a second call with the
same inputs reuses the prepared data) and returns a builder whose `as_dataset` gives, per image:

  image            [H, W, 3] uint8 RGB (stored as the original JPEG/PNG bytes, or as PNG after
                   conversion to RGB)
  image/id         int64 COCO image id
  image/filename   string, relative to the split's image folder
  image/size       [2] int32 (height, width) of the original image
  objects/         one entry per kept annotation (crowd ones included), in JSON order:
    id             [M] int64 COCO annotation id
    bbox_xyxy      [M, 4] float32 (x1, y1, x2, y2) absolute pixels of the original image: the JSON's
                   [x, y, w, h] converted and clipped to the image  <- use this one
    bbox           [M, 4] float32 tfds BBoxFeature, normalized (ymin, xmin, ymax, xmax), the same
                   box (kept for tfds tools such as `tfds.visualization`)
    label          [M] int64 contiguous class index 0..K-1 (tfds ClassLabel, names in
                   `info.features['objects']['label'].names`); the model's class is label + 1
    category_id    [M] int64 COCO category id
    is_crowd       [M] bool
    area           [M] float32 the JSON's area (mask area if absent)
    mask_rle_length [M] int32 number of RLE runs of each object
    keypoints      [M, K, 3] float32 (x, y, v) pixels of the original image, as in the JSON (COCO
                   convention: v 0 not labelled, 1 labelled but occluded, 2 visible; a point with
                   v = 0 is (0, 0, 0)); all zeros for objects of categories without keypoints.
                   Only in datasets with keypoints (a category with a non-empty `keypoints` list,
                   e.g. COCO's person_keypoints_*.json), K = that list's length.
    num_keypoints  [M] int32 the JSON's `num_keypoints` (if absent: the points with v > 0); only
                   with keypoints
  mask_rle         [R] int32 uncompressed COCO RLE counts of all objects' full-image masks,
                   concatenated in objects order (column-major runs starting with zeros);
                   decode with `transforms.decode_rle` (TF) or `coco_io.decode_rle` (numpy).
                   Equal pixel for pixel to pycocotools' `COCO.annToMask`.

Next to the data (`builder.data_dir`), `categories.json` maps label <-> contiguous class (label + 1)
<-> COCO category id <-> name (plus `keypoints` names, `skeleton` and, if the JSON gives them,
`sigmas` for categories with keypoints; `load_keypoint_info` reads them), and `skip_report.json`
lists what was skipped or fixed (see `coco_io`).
"""
import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from maskrcnn_jax.data import coco_io

try:  # This package never needs a GPU; leave it to jax.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (the caller got there first).
  pass

# 1.1.0: keypoints. The version is part of the builder config's hash, so data prepared by 1.0.0
# (which had no keypoint features) is never reused.
VERSION = "1.1.0"
CATEGORIES_FILE = "categories.json"
SKIP_REPORT_FILE = "skip_report.json"
_RELEASE_NOTE = ("Masks as uncompressed RLE, boxes as absolute xyxy and tfds BBox; COCO keypoints "
                 "when a category has them.")

# Annotation kinds: the JSON files' prefix in the COCO 2017 and custom layouts.
ANNOTATIONS = ("instances", "person_keypoints")
# Known folder layouts: (image folder, annotation file stem) relative to a root, per split name;
# the file is annotations/<kind>_<stem>.json.
_COCO2017 = {"train": ("train2017", "train2017"), "validation": ("val2017", "val2017")}
_SPLIT_ALIASES = {"val": "validation", "val2017": "validation", "train2017": "train",
                  "test2017": "test"}

# Parsed annotation files, kept between prepare_coco_format and the builder's generators so a large
# JSON is parsed once.
_PARSED = {}


@dataclasses.dataclass(frozen=True)
class SplitSource:
  """Where one split lives: an image folder and a COCO-format annotation JSON."""
  image_dir: str
  annotation_file: str


def _check_annotations(annotations):
  if annotations not in ANNOTATIONS:
    raise ValueError(f"annotations must be one of {ANNOTATIONS}, got {annotations!r}")
  return annotations


def resolve_splits(splits, annotations="instances"):
  """Normalizes the `splits` argument of `prepare_coco_format`.

  Args:
    splits: one of
      * a folder in COCO 2017 layout (`train2017/`, `val2017/`,
        `annotations/<annotations>_{train,val}2017.json`): splits 'train' and 'validation'
        (whichever exist);
      * a folder with `annotations/<annotations>_<name>.json` and images in `<name>/` (the layout
        `maskrcnn_jax.data.shapes` and `keypoint_shapes` write): one split per JSON, 'val' and
        'val2017' named 'validation', 'train2017' named 'train';
      * a mapping {split name: (image folder, annotation JSON)} (or {split: {'image_dir': ...,
        'annotation_file': ...}}).
    annotations: which JSON files a folder's layout names: 'instances' (boxes and masks) or
      'person_keypoints' (COCO's keypoint files: boxes, masks and keypoints). Not used with a
      mapping.

  Returns:
    {split name: SplitSource} with absolute paths, sorted by name.
  """
  prefix = _check_annotations(annotations) + "_"
  if isinstance(splits, (str, os.PathLike)):
    root = os.path.abspath(os.fspath(splits))
    out = {}
    for name, (img, stem) in _COCO2017.items():
      ann = os.path.join(root, "annotations", f"{prefix}{stem}.json")
      if os.path.isfile(ann):
        out[name] = SplitSource(os.path.join(root, img), ann)
    if not out:
      ann_dir = os.path.join(root, "annotations")
      names = sorted(os.listdir(ann_dir)) if os.path.isdir(ann_dir) else []
      for fname in names:
        if fname.startswith(prefix) and fname.endswith(".json"):
          stem = fname[len(prefix):-len(".json")]
          out[_SPLIT_ALIASES.get(stem, stem)] = SplitSource(os.path.join(root, stem),
                                                            os.path.join(ann_dir, fname))
    if not out:
      raise ValueError(f"{root}: no annotations/{prefix}*.json found (COCO layout expected)")
    splits = out
  elif not hasattr(splits, "items"):
    raise TypeError("splits must be a folder or a mapping {split: (image_dir, annotation_file)}")
  resolved = {}
  for name, src in splits.items():
    if isinstance(src, SplitSource):
      image_dir, ann = src.image_dir, src.annotation_file
    elif isinstance(src, dict):
      image_dir, ann = src["image_dir"], src["annotation_file"]
    else:
      image_dir, ann = src
    name = str(name)
    if not name.isidentifier():
      raise ValueError(f"split name {name!r} must be a Python identifier (tfds requirement)")
    ann = os.path.abspath(os.fspath(ann))
    image_dir = os.path.abspath(os.fspath(image_dir))
    if not os.path.isfile(ann):
      raise FileNotFoundError(f"annotation file for split {name!r} not found: {ann}")
    if not os.path.isdir(image_dir):
      raise FileNotFoundError(f"image folder for split {name!r} not found: {image_dir}")
    resolved[name] = SplitSource(image_dir, ann)
  return dict(sorted(resolved.items()))


def config_name_for(splits, annotations="instances"):
  """Builder config name for resolved splits: a hash of the format version, the annotation kind,
  the paths and annotation files' size and modification time, so edited annotations (or a newer
  format) give a new dataset and unchanged ones reuse the old."""
  h = hashlib.sha256(f"coco_format {VERSION} {_check_annotations(annotations)}".encode())
  for name, src in splits.items():
    st = os.stat(src.annotation_file)
    h.update(json.dumps([name, src.image_dir, src.annotation_file, st.st_size,
                         st.st_mtime_ns]).encode())
  return "h" + h.hexdigest()[:16]


@dataclasses.dataclass(eq=False)
class CocoFormatConfig(tfds.core.BuilderConfig):
  """Config made by `prepare_coco_format`: which folders, and the categories found there."""
  splits: tuple = dataclasses.field(default=(), repr=False)      # ((split, image_dir, json), ...)
  categories: tuple = dataclasses.field(default=(), repr=False)  # (coco_io.Category, ...)
  num_workers: int = dataclasses.field(default=1, repr=False)


class CocoFormat(tfds.core.GeneratorBasedBuilder):
  """COCO-format instance segmentation folders with masks (see the module docstring)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {VERSION: _RELEASE_NOTE}
  BUILDER_CONFIGS = []  # Made per input by prepare_coco_format.

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksums or other files live next to this module. (tfds 4.9.10 would otherwise look the
    # module up through `importlib_resources`, a package it does not declare as a dependency.)
    return None

  def __init__(self, *, config=None, **kwargs):
    if not isinstance(config, CocoFormatConfig):
      raise ValueError("CocoFormat needs a CocoFormatConfig; use prepare_coco_format(...)")
    super().__init__(config=config, **kwargs)
    self.skip_reports = {}

  def _info(self):
    cats = self.builder_config.categories
    objects = {
        "id": tfds.features.Scalar(dtype=np.int64),
        "bbox_xyxy": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "bbox": tfds.features.BBoxFeature(),
        "label": tfds.features.ClassLabel(names=[c.name for c in cats]),
        "category_id": tfds.features.Scalar(dtype=np.int64),
        "is_crowd": tfds.features.Scalar(dtype=np.bool_),
        "area": tfds.features.Scalar(dtype=np.float32),
        "mask_rle_length": tfds.features.Scalar(dtype=np.int32),
    }
    num_keypoints = len(coco_io.keypoint_names(cats))
    if num_keypoints:  # Only then: a dataset without keypoints keeps exactly the features above.
      objects["keypoints"] = tfds.features.Tensor(shape=(num_keypoints, 3), dtype=np.float32)
      objects["num_keypoints"] = tfds.features.Scalar(dtype=np.int32)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=None),
            "image/id": tfds.features.Scalar(dtype=np.int64),
            "image/filename": tfds.features.Text(),
            "image/size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "objects": tfds.features.Sequence(objects),
            "mask_rle": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        }),
        supervised_keys=None,
        description="COCO-format instance segmentation with masks (maskrcnn_jax).",
        metadata=tfds.core.MetadataDict(categories=[c.to_dict() for c in cats]),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(name, SplitSource(image_dir, ann))
            for name, image_dir, ann in self.builder_config.splits}

  def _generate_examples(self, split, source):
    data = _PARSED.pop(source.annotation_file, None)
    if data is None:
      data = coco_io.load_annotations(source.annotation_file)
    report = coco_io.SplitReport(split=split, annotation_file=source.annotation_file,
                                 image_dir=source.image_dir)
    self.skip_reports[split] = report
    for key, example in coco_io.iter_examples(data, source.image_dir,
                                              self.builder_config.categories, report,
                                              num_workers=self.builder_config.num_workers):
      box = example["objects"]["bbox_xyxy"]
      h, w = (int(v) for v in example["image/size"])
      example["objects"]["bbox"] = [
          tfds.features.BBox(ymin=float(b[1]) / h, xmin=float(b[0]) / w,
                             ymax=float(b[3]) / h, xmax=float(b[2]) / w) for b in box]
      yield key, example

  def download_and_prepare(self, *args, **kwargs):
    """tfds's download_and_prepare, then writes categories.json and the skip report."""
    self.skip_reports = {}
    super().download_and_prepare(*args, **kwargs)
    if self.skip_reports:  # Empty when the data was already there.
      write_metadata_files(self.data_dir, self.builder_config.categories, self.skip_reports)


def write_metadata_files(data_dir, categories, reports):
  """Writes categories.json and skip_report.json into `data_dir`, and prints the report."""
  cats = []
  for c in categories:
    d = {"label": c.label, "contiguous_id": c.label + 1, "category_id": c.category_id,
         "name": c.name, "supercategory": c.supercategory}
    if c.keypoints:
      d["keypoints"] = list(c.keypoints)
      d["skeleton"] = [list(p) for p in c.skeleton]
      if c.sigmas:
        d["sigmas"] = list(c.sigmas)
    cats.append(d)
  with tf.io.gfile.GFile(os.path.join(data_dir, CATEGORIES_FILE), "w") as f:
    json.dump(cats, f, indent=1)
  with tf.io.gfile.GFile(os.path.join(data_dir, SKIP_REPORT_FILE), "w") as f:
    json.dump({k: r.to_dict() for k, r in sorted(reports.items())}, f, indent=1)
  print(f"COCO-format dataset written to {data_dir}")
  for r in reports.values():
    print(r.summary())


def load_categories(builder_or_dir):
  """The saved category table: list of dicts with label (0-based), contiguous_id (label + 1, the
  model's class index), category_id (COCO), name, supercategory; categories with keypoints also
  have keypoints (K names), skeleton (1-based pairs) and, when the JSON gave them, sigmas."""
  data_dir = getattr(builder_or_dir, "data_dir", builder_or_dir)
  with tf.io.gfile.GFile(os.path.join(os.fspath(data_dir), CATEGORIES_FILE)) as f:
    return json.load(f)


def load_keypoint_info(builder_or_dir):
  """The keypoint layout of a prepared dataset, or None when it has no keypoints.

  Returns:
    dict(names=[K names], skeleton=[[a, b], ...] 1-based index pairs as in the COCO JSON ([] if
    it gave none), sigmas=[K floats] OKS sigmas from the JSON's category (a non-standard field)
    or None, contiguous_ids=[model class indices (label + 1) of the categories with keypoints]).
    All categories with keypoints share names, skeleton and sigmas (checked when preparing).
  """
  cats = [c for c in load_categories(builder_or_dir) if c.get("keypoints")]
  if not cats:
    return None
  skeleton = next((c["skeleton"] for c in cats if c.get("skeleton")), [])
  sigmas = next((c["sigmas"] for c in cats if c.get("sigmas")), None)
  return {"names": list(cats[0]["keypoints"]), "skeleton": [list(p) for p in skeleton],
          "sigmas": list(sigmas) if sigmas is not None else None,
          "contiguous_ids": [int(c["contiguous_id"]) for c in cats]}


def load_skip_report(builder_or_dir):
  """The saved skip report: {split: SplitReport as a dict}."""
  data_dir = getattr(builder_or_dir, "data_dir", builder_or_dir)
  with tf.io.gfile.GFile(os.path.join(os.fspath(data_dir), SKIP_REPORT_FILE)) as f:
    return json.load(f)


def prepare_coco_format(splits, data_dir, *, annotations="instances", num_workers=1,
                        file_format=None):
  """Builds (once) the tfds dataset of COCO-format folders and returns its builder.

  Args:
    splits: a COCO 2017 root, a folder with `annotations/<annotations>_<split>.json` +
      `<split>/`, or {split: (image_dir, annotation_json)}; see `resolve_splits`.
    data_dir: where tfds writes; the data goes to `data_dir/coco_format/<config>/<VERSION>`, where
      `<config>` is a hash of the inputs (format version, `annotations`, paths, annotation files'
      size and mtime).
    annotations: 'instances' (default) or 'person_keypoints': which JSON files a folder layout
      names (`annotations/person_keypoints_{train,val}2017.json` for COCO 2017). Keypoint features
      are added whenever the JSON's categories have keypoints, whichever file they come from.
    num_workers: processes that read images and rasterize masks (COCO 2017 train: use all cores).
    file_format: tfds file format (default tfrecord).

  Returns:
    A tfds builder; `builder.as_dataset(split=...)` gives the features listed in the module
    docstring. If the dataset is already prepared, it is opened read-only
    (`tfds.builder_from_directory`), without parsing the annotation files again.
  """
  splits = resolve_splits(splits, annotations)
  data_dir = os.path.abspath(os.fspath(data_dir))
  name = config_name_for(splits, annotations)
  builder_dir = os.path.join(data_dir, "coco_format", name, VERSION)
  if tf.io.gfile.exists(os.path.join(builder_dir, "dataset_info.json")):
    return tfds.builder_from_directory(builder_dir)
  datas = {}
  for split, src in splits.items():
    datas[split] = coco_io.load_annotations(src.annotation_file)
  categories = coco_io.read_categories(list(datas.values()))
  for split, src in splits.items():
    _PARSED[src.annotation_file] = datas[split]
  description = "; ".join(f"{k}: {v.image_dir} + {v.annotation_file}" for k, v in splits.items())
  config = CocoFormatConfig(
      name=name, version=VERSION, description=description, release_notes={VERSION: _RELEASE_NOTE},
      splits=tuple((k, v.image_dir, v.annotation_file) for k, v in splits.items()),
      categories=tuple(categories), num_workers=int(num_workers))
  kwargs = {"file_format": file_format} if file_format is not None else {}
  builder = CocoFormat(config=config, data_dir=data_dir, **kwargs)
  try:
    builder.download_and_prepare()
  finally:
    for src in splits.values():
      _PARSED.pop(src.annotation_file, None)
  return builder
