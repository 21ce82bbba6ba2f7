"""Synthetic shapes: reproducible from a seed, exact occlusion-aware masks, valid COCO JSON."""
import json
import os

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn_jax.data import shapes


def _read(root, split):
  coco = COCO(os.path.join(root, "annotations", f"instances_{split}.json"))
  return coco


def test_cli_writes_the_layout(tmp_path):
  out = tmp_path / "s"
  shapes.main(["--out", str(out), "--num_train", "5", "--num_val", "2", "--seed", "4",
               "--image_size", "48"])
  assert sorted(os.listdir(out / "train")) == [f"{i:06d}.png" for i in range(5)]
  assert len(os.listdir(out / "val")) == 2
  coco = _read(str(out), "train")
  assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle"]
  assert Image.open(out / "train" / "000000.png").size == (48, 48)


def test_reproducible_from_seed(tmp_path):
  for name, seed in (("a", 7), ("b", 7), ("c", 8)):
    shapes.generate_shapes(str(tmp_path / name), 6, 0, seed=seed, image_size=40)

  def files(name):
    root = tmp_path / name
    return [(root / "train" / f).read_bytes() for f in sorted(os.listdir(root / "train"))] + [
        (root / "annotations" / "instances_train.json").read_bytes()]
  assert files("a") == files("b")
  assert files("a") != files("c")
  # Image i depends on (seed, split, i) only, not on how many images are written.
  shapes.generate_shapes(str(tmp_path / "d"), 3, 0, seed=7, image_size=40)
  assert files("d")[:3] == files("a")[:3]


def test_masks_are_exact_and_occlusion_aware(shapes_folder):
  coco = _read(shapes_folder, "train")
  n_objects = []
  for image_id in coco.getImgIds():
    info = coco.imgs[image_id]
    image = np.asarray(Image.open(os.path.join(shapes_folder, "train", info["file_name"])))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    n_objects.append(len(anns))
    union = np.zeros(image.shape[:2], np.int32)
    for a in anns:
      m = coco.annToMask(a).astype(bool)
      union += m
      # Every visible pixel of an object has the object's (flat) colour.
      colours = np.unique(image[m].reshape(-1, 3), axis=0)
      assert len(colours) == 1, (image_id, a["id"], colours[:4])
      assert m.sum() == a["area"] >= 16
      ys, xs = np.nonzero(m)
      np.testing.assert_allclose(a["bbox"], [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                             ys.max() - ys.min() + 1])
      assert a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3)
    assert union.max() <= 1                                   # visible masks never overlap
  assert min(n_objects) >= 1 and max(n_objects) <= 6
  assert len(set(n_objects)) > 2


def test_render_drops_hidden_objects_and_keeps_masks_disjoint():
  hidden_seen = False
  for i in range(40):
    image, objects = shapes.render_image(11, "train", i, image_size=48, min_objects=6,
                                         max_objects=6, min_visible_area=30)
    union = np.zeros((48, 48), np.int32)
    for o in objects:
      union += o["mask"]
      assert o["mask"].sum() >= 30
      np.testing.assert_array_equal(image[o["mask"]], np.tile(o["color"], (o["mask"].sum(), 1)))
    assert union.max() <= 1
    hidden_seen |= len(objects) < 6
  assert hidden_seen


def test_json_is_valid_coco(shapes_folder):
  with open(os.path.join(shapes_folder, "annotations", "instances_val.json")) as f:
    data = json.load(f)
  assert {"images", "annotations", "categories"} <= set(data)
  ids = [a["id"] for a in data["annotations"]]
  assert len(ids) == len(set(ids))
  assert all(isinstance(a["segmentation"]["counts"], str) for a in data["annotations"])


def test_objects_hidden_beyond_the_visible_fraction_are_dropped():
  fractions, counts = {}, {}
  for threshold in (0.1, 0.5):
    fractions[threshold], counts[threshold] = [], 0
    for i in range(30):
      _, objects = shapes.render_image(4, "val", i, image_size=64, min_objects=6, max_objects=6,
                                       min_visible_fraction=threshold)
      counts[threshold] += len(objects)
      fractions[threshold] += [o["visible_fraction"] for o in objects]
      for o in objects:  # the fraction reported is the visible mask over a shape of that size
        assert o["mask"].sum() > 0 and 0 < o["visible_fraction"] <= 1
  assert min(fractions[0.5]) >= 0.5
  assert min(fractions[0.1]) < 0.5          # the lower threshold does keep half-hidden objects
  assert counts[0.5] < counts[0.1]
