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
