"""Tiny COCO-format folders and prepared datasets shared by the data tests (built once)."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 1, "name": "cat", "supercategory": "animal"},
              {"id": 5, "name": "dog", "supercategory": "animal"},
              {"id": 90, "name": "zebra", "supercategory": "animal"}]


def _rgb(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(img, path, fmt, **kw):
  img.save(path, format=fmt, **kw)


def _compressed_rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask):
  flat = mask.astype(bool).ravel(order="F")
  counts, prev, run = [], False, 0
  for v in flat:
    if v != prev:
      counts.append(run)
      run, prev = 0, v
    run += 1
  counts.append(run)
  return {"size": list(mask.shape), "counts": counts}


def _box(mask):
  ys, xs = np.nonzero(mask)
  return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
          float(ys.max() - ys.min() + 1)]


def write_coco_folder(root):
  """A small COCO-format folder exercising image modes, sizes and every segmentation kind.

  Images (id: mode, format, h x w):
    1: RGB PNG 48 x 64 - two-polygon cat, compressed-RLE dog, uncompressed-RLE crowd zebra
    2: L JPEG 70 x 50 - polygon touching the border, compressed RLE
    3: RGBA PNG 40 x 40 - uncompressed RLE (not crowd), polygon
    4: CMYK JPEG 45 x 33 - polygon
    5: RGB JPEG 60 x 80 - no annotation
    6: P PNG 64 x 64 - 7 small square polygons of increasing size
    7: RGB PNG 32 x 48 - crowd only
  """
  rng = np.random.default_rng(123)
  img_dir = os.path.join(root, "images")
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  images, anns = [], []

  def add_image(image_id, name, pil, fmt, **kw):
    _save(pil, os.path.join(img_dir, name), fmt, **kw)
    images.append({"id": image_id, "file_name": name, "width": pil.size[0],
                   "height": pil.size[1]})

  def add_ann(image_id, cat, seg, bbox, crowd=0, area=None):
    anns.append({"id": 100 + len(anns), "image_id": image_id, "category_id": cat,
                 "segmentation": seg, "bbox": bbox, "iscrowd": crowd,
                 "area": float(area if area is not None else bbox[2] * bbox[3] * 0.7)})

  add_image(1, "a.png", Image.fromarray(_rgb(rng, 48, 64)), "PNG")
  add_ann(1, 1, [[3.5, 4.0, 20.0, 4.5, 18.2, 22.7, 5.0, 19.0], [30, 30, 40, 30, 35, 44]],
          [3.5, 4.0, 36.5, 40.0])
  m = np.zeros((48, 64), np.uint8)
  m[10:30, 40:60] = 1
  m[15:18, 45:50] = 0
  add_ann(1, 5, _compressed_rle(m), _box(m), area=m.sum())
  m = np.zeros((48, 64), np.uint8)
  m[0:12, 0:64:3] = 1
  add_ann(1, 90, _uncompressed_rle(m), _box(m), crowd=1, area=m.sum())

  add_image(2, "b.jpg", Image.fromarray(_rgb(rng, 70, 50)).convert("L"), "JPEG", quality=90)
  add_ann(2, 5, [[0.0, 0.0, 49.99, 0.0, 49.99, 30.0, 0.0, 69.99]], [0.0, 0.0, 49.99, 69.99])
  m = np.zeros((70, 50), np.uint8)
  m[40:70, 20:50] = 1
  add_ann(2, 1, _compressed_rle(m), _box(m), area=m.sum())

  add_image(3, "c.png", Image.fromarray(
      np.concatenate([_rgb(rng, 40, 40), rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)], -1),
      mode="RGBA"), "PNG")
  m = np.zeros((40, 40), np.uint8)
  m[5:25, 5:7] = 1
  m[20:22, 5:35] = 1
  add_ann(3, 90, _uncompressed_rle(m), _box(m), area=m.sum())
  add_ann(3, 1, [[10.0, 30.0, 39.0, 39.0, 12.0, 39.5]], [10.0, 30.0, 29.0, 9.5])

  add_image(4, "d.jpg", Image.fromarray(_rgb(rng, 45, 33)).convert("CMYK"), "JPEG", quality=95)
  add_ann(4, 5, [[2.0, 2.0, 30.0, 5.0, 16.0, 40.0]], [2.0, 2.0, 28.0, 38.0])

  add_image(5, "e.jpg", Image.fromarray(_rgb(rng, 60, 80)), "JPEG", quality=90)

  add_image(6, "f.png", Image.fromarray(_rgb(rng, 64, 64)).convert("P"), "PNG")
  for k in range(7):
    x, y, s = 2 + 9 * k, 2 + 8 * k, 2 + k
    add_ann(6, [1, 5, 90][k % 3], [[x, y, x + s, y, x + s, y + s, x, y + s]],
            [float(x), float(y), float(s), float(s)], area=s * s)

  add_image(7, "g.png", Image.fromarray(_rgb(rng, 32, 48)), "PNG")
  m = np.zeros((32, 48), np.uint8)
  m[4:20, 10:30] = 1
  add_ann(7, 1, _uncompressed_rle(m), _box(m), crowd=1, area=m.sum())

  ann_file = os.path.join(root, "annotations", "instances_train.json")
  with open(ann_file, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)
  return img_dir, ann_file


KP_NAMES = ["head", "left_hand", "right_hand", "tail"]
KP_CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person", "keypoints": KP_NAMES,
                  "skeleton": [[1, 2], [1, 3], [1, 4]], "sigmas": [0.05, 0.1, 0.1, 0.2]},
                 {"id": 2, "name": "ball", "supercategory": "thing"}]
# What the builder must store for each annotation id of `write_keypoint_folder`: (keypoints [K, 3],
# num_keypoints). Worked out by hand from the records below.
KP_EXPECTED = {
    1: ([[20, 10, 2], [35, 20, 1], [0, 0, 0], [25, 30, 2]], 3),
    2: ([[45, 12, 2], [0, 0, 0], [60, 40, 2], [50, 38, 1]], 3),
    3: ([[0, 0, 0]] * 4, 0),
    4: ([[0, 0, 0]] * 4, 0),
    5: ([[0, 0, 0]] * 4, 0), 6: ([[0, 0, 0]] * 4, 0), 7: ([[0, 0, 0]] * 4, 0),
    8: ([[0, 0, 0]] * 4, 0), 9: ([[0, 0, 0]] * 4, 0),
    10: ([[16, 16, 2], [0, 0, 0], [0, 0, 0], [16, 30, 2]], 2),
    11: ([[3.5, 4, 2], [3.5, 6, 2], [3.5, 8, 1], [3.5, 12, 2]], 4),
    12: ([[0, 0, 0]] * 4, 0),
}


def write_keypoint_folder(root):
  """A tiny COCO person_keypoints folder (K = 4: head, left_hand, right_hand, tail) with good and
  bad keypoint records; `KP_EXPECTED` holds what must be stored.

  Images (id: h x w):
    1: 40 x 60 - person 1: a v = 0 point with non-zero (x, y), an occluded (v = 1) point;
       person 2: a labelled point outside the image (x = 70 > 60), one exactly on the corner
       (60, 40) (inside: [0, W] x [0, H]); ball 3 (category without keypoints); crowd person 4.
       6 labelled keypoints on non-crowd objects.
    2: 32 x 32 - persons 5-9 with bad records (33 numbers, a string, v = 3, NaN, no keypoints);
       person 10 without num_keypoints (2 labelled points).
    3: 32 x 32 - person 11 whose box is 1 px wide (torchvision's "empty box"), 4 labelled points.
    4: 32 x 32 - only a ball (12).
    5: 32 x 32 - no annotation.
  """
  img_dir = os.path.join(root, "images")
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  rng = np.random.default_rng(5)
  sizes = {1: (40, 60), 2: (32, 32), 3: (32, 32), 4: (32, 32), 5: (32, 32)}
  images = []
  for image_id, (h, w) in sizes.items():
    Image.fromarray(_rgb(rng, h, w)).save(os.path.join(img_dir, f"{image_id}.png"))
    images.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
  anns = []

  def add(ann_id, image_id, box, cat=1, keypoints=None, num=None, crowd=0):
    x, y, bw, bh = box
    ann = {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": crowd,
           "bbox": [float(v) for v in box], "area": float(bw * bh),
           "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]}
    if keypoints is not None:
      ann["keypoints"] = keypoints
    if num is not None:
      ann["num_keypoints"] = num
    anns.append(ann)
  add(1, 1, (10, 5, 30, 30), keypoints=[20, 10, 2, 35, 20, 1, 5, 7, 0, 25, 30, 2], num=3)
  add(2, 1, (40, 10, 15, 25), keypoints=[45, 12, 2, 70, 15, 2, 60, 40, 2, 50, 38, 1], num=4)
  add(3, 1, (0, 0, 8, 8), cat=2)
  add(4, 1, (0, 20, 10, 10), keypoints=[0] * 12, num=0, crowd=1)
  add(5, 2, (2, 2, 10, 10), keypoints=[1] * 11, num=3)
  add(6, 2, (4, 4, 10, 10), keypoints=[1, 1, 2, "7", 1, 2, 0, 0, 0, 0, 0, 0], num=2)
  add(7, 2, (6, 6, 10, 10), keypoints=[1, 1, 2, 3, 3, 3, 0, 0, 0, 0, 0, 0], num=2)
  add(8, 2, (8, 8, 10, 10), keypoints=[float("nan"), 1, 2] + [0] * 9, num=1)
  add(9, 2, (10, 10, 10, 10), num=0)
  add(10, 2, (12, 12, 10, 10), keypoints=[16, 16, 2, 0, 0, 0, 0, 0, 0, 16, 30, 2])
  add(11, 3, (3, 3, 1, 10), keypoints=[3.5, 4, 2, 3.5, 6, 2, 3.5, 8, 1, 3.5, 12, 2], num=4)
  add(12, 4, (5, 5, 10, 10), cat=2)
  ann_file = os.path.join(root, "annotations", "person_keypoints_train.json")
  with open(ann_file, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": KP_CATEGORIES}, f)
  return img_dir, ann_file


@pytest.fixture(scope="session")
def tf_quiet():
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")
  tfds.display_progress_bar(False)
  return tf


@pytest.fixture(scope="session")
def coco_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("coco"))
  img_dir, ann_file = write_coco_folder(root)
  return {"root": root, "image_dir": img_dir, "annotation_file": ann_file}


@pytest.fixture(scope="session")
def coco_builder(coco_folder, tmp_path_factory, tf_quiet):
  from maskrcnn_jax.data import prepare_coco_format
  data_dir = str(tmp_path_factory.mktemp("tfds_coco"))
  return prepare_coco_format({"train": (coco_folder["image_dir"], coco_folder["annotation_file"])},
                             data_dir)


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
  from maskrcnn_jax.data import shapes
  root = str(tmp_path_factory.mktemp("shapes"))
  shapes.generate_shapes(root, num_train=24, num_val=10, seed=3, image_size=64)
  return root


@pytest.fixture(scope="session")
def shapes_builder(shapes_folder, tmp_path_factory, tf_quiet):
  from maskrcnn_jax.data import prepare_coco_format
  return prepare_coco_format(shapes_folder, str(tmp_path_factory.mktemp("tfds_shapes")))


@pytest.fixture(scope="session")
def keypoint_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("coco_kp"))
  img_dir, ann_file = write_keypoint_folder(root)
  return {"root": root, "image_dir": img_dir, "annotation_file": ann_file}


@pytest.fixture(scope="session")
def keypoint_builder(keypoint_folder, tmp_path_factory, tf_quiet):
  from maskrcnn_jax.data import prepare_coco_format
  return prepare_coco_format(
      {"train": (keypoint_folder["image_dir"], keypoint_folder["annotation_file"])},
      str(tmp_path_factory.mktemp("tfds_kp")))


@pytest.fixture(scope="session")
def figures_folder(tmp_path_factory):
  from maskrcnn_jax.data import keypoint_shapes
  root = str(tmp_path_factory.mktemp("figures"))
  keypoint_shapes.generate_keypoint_shapes(root, num_train=12, num_val=6, seed=2, image_size=64)
  return root


@pytest.fixture(scope="session")
def figures_builder(figures_folder, tmp_path_factory, tf_quiet):
  from maskrcnn_jax.data import prepare_coco_format
  return prepare_coco_format(figures_folder, str(tmp_path_factory.mktemp("tfds_figures")),
                             annotations="person_keypoints")


def encode_png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def pytest_collection_modifyitems(items):
  # pycocotools 2.0.11 + numpy 2 warn on every mask decode; not ours to fix.
  here = os.path.dirname(__file__)
  for item in items:
    if str(item.fspath).startswith(here):
      item.add_marker(pytest.mark.filterwarnings(
          "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"))
