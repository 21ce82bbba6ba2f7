"""Keypoints: stored as the JSON gives them (bad records counted), carried through flip, resize,
crop and padding into `gt_keypoints`, and the training filter on labelled keypoints."""
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from maskrcnn_jax.data import builder as builder_lib, coco_io, keypoints as kp_lib, pipeline
from tests.data.conftest import KP_EXPECTED, KP_NAMES

tf = pytest.importorskip("tensorflow")

from maskrcnn_jax.data import transforms as T  # noqa: E402
from tests.data.test_transforms import _both, _raw_examples  # noqa: E402

OLD_OBJECT_FEATURES = {"id", "bbox_xyxy", "bbox", "label", "category_id", "is_crowd", "area",
                       "mask_rle_length"}
# torchvision's references/detection/transforms.py `_flip_coco_person_keypoints`.
TORCHVISION_FLIP_INDS = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
PERM = (0, 2, 1, 3)           # KP_NAMES: head, left_hand, right_hand, tail


def _examples(builder, split="train"):
  import tensorflow_datasets as tfds
  return {int(ex["image/id"]): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def test_builder_stores_the_json_keypoints_and_counts_bad_records(keypoint_builder):
  objects = keypoint_builder.info.features["objects"].feature
  assert set(objects.keys()) == OLD_OBJECT_FEATURES | {"keypoints", "num_keypoints"}
  assert objects["keypoints"].shape == (4, 3) and objects["keypoints"].dtype == np.float32
  seen = set()
  for image_id, ex in _examples(keypoint_builder).items():
    objs = ex["objects"]
    assert objs["keypoints"].shape == (len(objs["id"]), 4, 3)
    assert objs["keypoints"].dtype == np.float32 and objs["num_keypoints"].dtype == np.int32
    for k, ann_id in enumerate(objs["id"]):
      want, num = KP_EXPECTED[int(ann_id)]
      np.testing.assert_array_equal(objs["keypoints"][k], np.array(want, np.float32),
                                    err_msg=str(ann_id))
      assert objs["num_keypoints"][k] == num, ann_id
      seen.add(int(ann_id))
  assert seen == set(KP_EXPECTED)
  report = builder_lib.load_skip_report(keypoint_builder)["train"]
  assert report["fixed"] == {"bad_keypoints": 5, "keypoint_outside_image": 1}
  assert report["skipped"] == {}
  assert sorted(report["examples"]["bad_keypoints"]) == [5, 6, 7, 8, 9]
  assert report["examples"]["keypoint_outside_image"] == [2]


def test_categories_and_keypoint_info(keypoint_builder, keypoint_folder):
  data = json.load(open(keypoint_folder["annotation_file"]))
  person = data["categories"][0]
  cats = builder_lib.load_categories(keypoint_builder)
  assert cats[0]["keypoints"] == person["keypoints"] and cats[0]["skeleton"] == person["skeleton"]
  assert cats[0]["sigmas"] == person["sigmas"]
  assert not {"keypoints", "skeleton", "sigmas"} & set(cats[1])          # the ball has none
  assert builder_lib.load_keypoint_info(keypoint_builder) == {
      "names": KP_NAMES, "skeleton": [[1, 2], [1, 3], [1, 4]], "sigmas": [0.05, 0.1, 0.1, 0.2],
      "contiguous_ids": [1]}


def test_datasets_without_keypoints_are_unchanged(coco_builder, shapes_builder):
  for b in (coco_builder, shapes_builder):
    assert set(b.info.features["objects"].feature.keys()) == OLD_OBJECT_FEATURES
    assert builder_lib.load_keypoint_info(b) is None
    assert all(set(c) == {"label", "contiguous_id", "category_id", "name", "supercategory"}
               for c in builder_lib.load_categories(b))
  # Their batches: test_pipeline.py checks the exact key set (no gt_keypoints).
  with pytest.raises(ValueError, match="no keypoints"):
    pipeline.make_dataset(coco_builder, "train", batch_size=2, training=True,
                          min_keypoints_per_image=1)
  with pytest.raises(ValueError, match="no keypoints"):
    pipeline.make_dataset(coco_builder, "train", batch_size=2, training=True,
                          keypoint_flip_permutation=(0,))


@pytest.mark.parametrize("cats,match", [
    ([{"id": 1, "name": "a", "keypoints": ["x", "y"]},
      {"id": 2, "name": "b", "keypoints": ["x", "z"]}], "same keypoint names"),
    ([{"id": 1, "name": "a", "keypoints": ["x", "y"], "sigmas": [0.1]}], "sigmas"),
    ([{"id": 1, "name": "a", "keypoints": ["x", "y"], "sigmas": [0.1, -1]}], "sigmas"),
    ([{"id": 1, "name": "a", "keypoints": ["x", "y"], "skeleton": [[1, 3]]}], "skeleton"),
    ([{"id": 1, "name": "a", "keypoints": ["x", "x"]}], "repeated"),
    ([{"id": 1, "name": "a", "keypoints": "xy"}], "list of names"),
])
def test_inconsistent_or_malformed_keypoint_categories_are_errors(cats, match):
  with pytest.raises(ValueError, match=match):
    coco_io.read_categories([{"categories": cats}])


def test_keypoint_names_across_splits_must_agree():
  a = {"categories": [{"id": 1, "name": "p", "keypoints": ["x", "y"], "skeleton": [[1, 2]]}]}
  b = {"categories": [{"id": 1, "name": "p", "keypoints": ["x", "y"]}]}       # no skeleton: fine
  (cat,) = coco_io.read_categories([b, a])
  assert cat.keypoints == ("x", "y") and cat.skeleton == ((1, 2),) and cat.sigmas == ()
  c = {"categories": [{"id": 1, "name": "p", "keypoints": ["y", "x"]}]}
  with pytest.raises(ValueError, match="in one split"):
    coco_io.read_categories([a, c])


def test_an_older_format_or_other_annotations_get_a_new_config(keypoint_folder, monkeypatch):
  splits = builder_lib.resolve_splits(
      {"train": (keypoint_folder["image_dir"], keypoint_folder["annotation_file"])})
  name = builder_lib.config_name_for(splits, "person_keypoints")
  assert builder_lib.config_name_for(splits, "instances") != name
  monkeypatch.setattr(builder_lib, "VERSION", "1.0.0")       # data prepared before keypoints
  assert builder_lib.config_name_for(splits, "person_keypoints") != name
  with pytest.raises(ValueError, match="annotations must be one of"):
    builder_lib.resolve_splits(keypoint_folder["root"], "captions")


def test_resolve_person_keypoints_in_both_layouts(tmp_path):
  root = tmp_path / "coco"
  (root / "annotations").mkdir(parents=True)
  for name in ("train2017", "val2017"):
    (root / name).mkdir()
    for kind in ("instances", "person_keypoints"):
      (root / "annotations" / f"{kind}_{name}.json").write_text("{}")
  splits = builder_lib.resolve_splits(str(root), annotations="person_keypoints")
  assert {k: v.annotation_file for k, v in splits.items()} == {
      "train": str(root / "annotations/person_keypoints_train2017.json"),
      "validation": str(root / "annotations/person_keypoints_val2017.json")}
  assert splits["train"].image_dir == str(root / "train2017")

  custom = tmp_path / "custom"
  (custom / "annotations").mkdir(parents=True)
  for name in ("train", "val", "extra"):
    (custom / name).mkdir()
  for fname in ("instances_train.json", "instances_extra.json", "person_keypoints_train.json",
                "person_keypoints_val.json"):
    (custom / "annotations" / fname).write_text("{}")
  splits = builder_lib.resolve_splits(str(custom), annotations="person_keypoints")
  assert {k: (v.image_dir, v.annotation_file) for k, v in splits.items()} == {
      "train": (str(custom / "train"), str(custom / "annotations/person_keypoints_train.json")),
      "validation": (str(custom / "val"), str(custom / "annotations/person_keypoints_val.json"))}
  assert list(builder_lib.resolve_splits(str(custom))) == ["extra", "train"]
  with pytest.raises(ValueError, match="person_keypoints_"):
    builder_lib.resolve_splits(str(tmp_path / "coco" / "train2017"), "person_keypoints")


def test_flip_permutation_from_names_and_override():
  assert list(kp_lib.flip_permutation(kp_lib.COCO_PERSON_KEYPOINTS)) == TORCHVISION_FLIP_INDS
  assert kp_lib.flip_permutation(KP_NAMES) == PERM
  # Partners only when both exist; other names stay.
  assert kp_lib.flip_permutation(["left_a", "b", "right_c", "left_c"]) == (0, 1, 3, 2)
  assert kp_lib.resolve_flip_permutation(KP_NAMES, ()) == PERM
  assert kp_lib.resolve_flip_permutation(KP_NAMES, [0, 1, 2, 3]) == (0, 1, 2, 3)
  with pytest.raises(ValueError, match="not a permutation"):
    kp_lib.resolve_flip_permutation(KP_NAMES, [0, 1, 2])
  with pytest.raises(ValueError, match="own inverse"):
    kp_lib.resolve_flip_permutation(KP_NAMES, [1, 2, 0, 3])


def _kp_features(builder, image_id):
  raw = _raw_examples(builder)[image_id]
  return {k: tf.constant(v) for k, v in _both(T.decode_coco_example(8), raw).items()}


def test_decode_keeps_the_non_crowd_keypoints(keypoint_builder):
  f = _kp_features(keypoint_builder, 1)
  np.testing.assert_array_equal(f["gt_keypoints"], np.array([KP_EXPECTED[i][0]
                                                             for i in (1, 2, 3)], np.float32))
  assert f["gt_boxes"].shape[0] == 3 and f["crowd_boxes"].shape[0] == 1


def test_flip_swaps_left_and_right_and_twice_is_identity(keypoint_builder):
  f = _kp_features(keypoint_builder, 1)
  w = 60.0
  once = _both(lambda x: T.flip_left_right(x, PERM), f)
  want = np.zeros((3, 4, 3), np.float32)
  for m, ann_id in enumerate((1, 2, 3)):
    kp = np.array(KP_EXPECTED[ann_id][0], np.float32)
    for new, old in ((0, 0), (1, 2), (2, 1), (3, 3)):     # left_hand <- mirrored right_hand, ...
      if kp[old, 2] > 0:
        want[m, new] = [w - kp[old, 0], kp[old, 1], kp[old, 2]]
  np.testing.assert_array_equal(once["gt_keypoints"], want)
  twice = _both(lambda x: T.flip_left_right(T.flip_left_right(x, PERM), PERM), f)
  for k in ("image", "gt_boxes", "gt_masks", "crowd_boxes", "gt_keypoints"):
    np.testing.assert_array_equal(twice[k], np.asarray(f[k]), err_msg=k)
  always = _both(T.random_flip(1.0, PERM), dict(f, seed=tf.constant([1, 2], tf.int64)))
  np.testing.assert_array_equal(always["gt_keypoints"], want)
  with pytest.raises(ValueError, match="keypoint_flip_permutation"):
    T.flip_left_right(f)


def test_resize_scales_keypoints_with_the_image(keypoint_builder):
  f = _kp_features(keypoint_builder, 1)                       # 40 x 60
  out = _both(T.resize_to_fit((96, 96)), f)                   # -> 64 x 96: x 1.6, y 1.6
  assert tuple(out["image_size"]) == (64, 96)
  kp = np.asarray(f["gt_keypoints"], np.float64)
  want = kp * [96 / 60, 64 / 40, 1]
  np.testing.assert_allclose(out["gt_keypoints"], want, rtol=1e-6)
  assert out["gt_keypoints"][1, 2, 0] <= 96 and out["gt_keypoints"][1, 2, 1] <= 64  # the corner
  short = _both(T.resize_short_side(20, 100), f)              # -> 20 x 30
  np.testing.assert_allclose(short["gt_keypoints"], kp * [0.5, 0.5, 1], rtol=1e-6)


def test_random_crop_moves_keypoints_and_removes_those_outside():
  h, w = 60, 80
  yy, xx = np.mgrid[:h, :w]
  boxes = np.array([[10, 10, 70, 50], [0, 0, 6, 6]], np.float32)
  kps = np.array([[[15, 12, 2], [40, 30, 1], [68, 48, 2], [33, 0, 0]],
                  [[1, 1, 2], [5, 5, 2], [0, 0, 0], [3, 3, 1]]], np.float32)
  f = {"image": tf.constant(np.stack([yy, xx, np.zeros_like(xx)], -1).astype(np.uint8)),
       "image_size": tf.constant([h, w]), "scale": tf.ones([2]),
       "gt_boxes": tf.constant(boxes), "gt_classes": tf.constant([1, 2]),
       "gt_masks": tf.ones([2, 4, 4]), "crowd_boxes": tf.zeros([0, 4]),
       "gt_keypoints": tf.constant(kps)}
  removed = dropped_object = 0
  for s in range(4):
    out = _both(T.random_crop((36, 40)), dict(f, seed=tf.constant([s, 3], tf.int64)))
    oy, ox = (int(v) for v in out["image"][0, 0, :2])
    keep = [m for m in range(2) if min(boxes[m, 2], ox + 40) > max(boxes[m, 0], ox) and
            min(boxes[m, 3], oy + 36) > max(boxes[m, 1], oy)]
    want = []
    for m in keep:
      rows = []
      for x, y, v in kps[m]:
        x, y = x - ox, y - oy
        rows.append([x, y, v] if v > 0 and 0 <= x <= 40 and 0 <= y <= 36 else [0, 0, 0])
        removed += v > 0 and rows[-1][2] == 0
      want.append(rows)
    np.testing.assert_array_equal(out["gt_keypoints"], np.array(want, np.float32).reshape(-1, 4, 3))
    dropped_object += len(keep) < 2
  assert removed >= 3 and dropped_object >= 1


def test_pad_instances_keeps_keypoints_aligned(keypoint_builder):
  """Image 1's three non-crowd objects, max_instances 2: the two largest boxes (persons 1 and 2)
  keep their keypoints, in order; padding rows are zeros."""
  batch = next(pipeline.make_dataset(keypoint_builder, "train", batch_size=5, training=False,
                                     image_size=(64, 64), max_instances=2, mask_crop_size=8))
  b = list(batch["image_id"]).index(1)
  sy, sx = batch["scale"][b]
  got = batch["gt_keypoints"][b] / np.array([sx, sy, 1], np.float32)
  np.testing.assert_allclose(got, [KP_EXPECTED[1][0], KP_EXPECTED[2][0]], rtol=1e-5)
  assert batch["num_dropped"][b] == 1
  four = list(batch["image_id"]).index(4)                     # a ball only: one row of zeros
  np.testing.assert_array_equal(batch["gt_valid"][four], [True, False])
  assert not batch["gt_keypoints"][four].any()
  padded = next(pipeline.make_dataset(keypoint_builder, "train", batch_size=5, training=False,
                                      image_size=(64, 64), max_instances=6, mask_crop_size=8))
  assert padded["gt_keypoints"].shape == (5, 6, 4, 3)
  assert not padded["gt_keypoints"][~padded["gt_valid"]].any()


def test_min_keypoints_per_image_drops_exactly_those_images(keypoint_builder):
  """Labelled keypoints on non-crowd objects: image 1: 6, 2: 2, 3: 4 but only a 1 px wide box
  (dropped whenever the filter is on, as torchvision's `_has_only_empty_bbox`), 4: 0, 5: no
  objects (dropped in training anyway)."""
  def ids(training, minimum):
    # The filter reads the stored records, before any transform: only the ids are needed.
    batches = pipeline.make_dataset(
        keypoint_builder, "train", batch_size=1, training=training, num_epochs=1,
        transforms=[lambda ex: {"image_id": ex["image/id"]}], min_keypoints_per_image=minimum)
    return sorted(int(b["image_id"][0]) for b in batches)
  for minimum, want in ((0, [1, 2, 3, 4]), (2, [1, 2]), (3, [1]), (6, [1]), (7, [])):
    assert ids(True, minimum) == want, minimum
  assert ids(False, 7) == [1, 2, 3, 4, 5]                     # evaluation never filters


def test_batches_carry_keypoints_in_the_resized_frame(figures_builder, figures_folder):
  """Evaluation batches map back to the JSON's keypoints (matched by box); training batches with
  flips, jitter and crops keep the contract: v in {0, 1, 2}, v = 0 points and padding all zeros,
  labelled points inside the resized image."""
  coco = COCO(os.path.join(figures_folder, "annotations", "person_keypoints_val.json"))
  (batch,) = list(pipeline.make_dataset(figures_builder, "validation", batch_size=6,
                                        training=False, image_size=(96, 96), max_instances=6,
                                        mask_crop_size=8))
  assert batch["gt_keypoints"].shape == (6, 6, 11, 3)
  assert batch["gt_keypoints"].dtype == np.float32
  checked = 0
  for b in range(6):
    sy, sx = batch["scale"][b]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(batch["image_id"][b])]))
    assert batch["gt_valid"][b].sum() == len(anns)
    for m, a in enumerate(anns):
      x, y, bw, bh = a["bbox"]
      np.testing.assert_allclose(batch["gt_boxes"][b, m] / [sx, sy, sx, sy],
                                 [x, y, x + bw, y + bh], atol=1e-3)
      got = batch["gt_keypoints"][b, m] / np.array([sx, sy, 1], np.float32)
      np.testing.assert_allclose(got, np.array(a["keypoints"]).reshape(11, 3), atol=1e-3)
      checked += 1
  assert checked >= 6
  it = pipeline.make_dataset(figures_builder, "train", batch_size=4, training=True, seed=3,
                             image_size=(64, 64), max_instances=6, mask_crop_size=8,
                             resize="fit", scale_range=(0.7, 1.6))
  for _ in range(3):
    batch = next(it)
    kp = batch["gt_keypoints"]
    assert set(np.unique(kp[..., 2])) <= {0.0, 1.0, 2.0}
    assert not kp[kp[..., 2] == 0].any() and not kp[~batch["gt_valid"]].any()
    for b in range(4):
      h, w = batch["image_size"][b]
      pts = kp[b][kp[b, ..., 2] > 0]
      assert np.all(pts[:, 0] >= 0) and np.all(pts[:, 0] <= w)
      assert np.all(pts[:, 1] >= 0) and np.all(pts[:, 1] <= h)


def test_pipeline_flip_uses_the_names_or_the_override(keypoint_builder):
  """flip_prob=1: image 1's person 1 has its left hand (35, 20, v=1) and an unlabelled right
  hand; by the names the flipped left hand is unlabelled and the right hand is (60 - 35, 20);
  with the identity override the point stays a left hand."""
  def first(**kw):
    batches = pipeline.make_dataset(keypoint_builder, "train", batch_size=1, training=True,
                                    num_epochs=1, flip_prob=1.0, image_size=(60, 60),
                                    max_instances=3, mask_crop_size=8, **kw)
    for batch in batches:
      if batch["image_id"][0] == 1:
        return batch["gt_keypoints"][0, 0]                  # person 1; 40 x 60 kept as is
  np.testing.assert_allclose(first(), [[40, 10, 2], [0, 0, 0], [25, 20, 1], [35, 30, 2]])
  np.testing.assert_allclose(first(keypoint_flip_permutation=[0, 1, 2, 3]),
                             [[40, 10, 2], [25, 20, 1], [0, 0, 0], [35, 30, 2]])
  with pytest.raises(ValueError, match="own inverse"):
    first(keypoint_flip_permutation=[1, 2, 0, 3])
