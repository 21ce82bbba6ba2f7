"""The tf.data pipeline: keys and shapes, sharding, determinism, empty images, eval padding."""
import numpy as np
import pytest
from pycocotools.coco import COCO

from maskrcnn_jax.data import pipeline

EXPECTED = {  # key: (shape without B, dtype)
    "image": ((64, 64, 3), np.float32), "image_size": ((2,), np.int32),
    "original_size": ((2,), np.int32), "scale": ((2,), np.float32), "image_id": ((), np.int64),
    "gt_boxes": ((5, 4), np.float32), "gt_classes": ((5,), np.int32),
    "gt_masks": ((5, 16, 16), np.float32), "gt_valid": ((5,), np.bool_),
    "crowd_boxes": ((3, 4), np.float32), "crowd_valid": ((3,), np.bool_),
    "num_dropped": ((), np.int32), "num_crowd_dropped": ((), np.int32),
    "example_valid": ((), np.bool_),
}
KW = dict(image_size=(64, 64), max_instances=5, mask_crop_size=16, max_crowd_instances=3)


def _ids(batches):
  return [int(i) for b in batches for i, v in zip(b["image_id"], b["example_valid"]) if v]


def test_training_batches_keys_shapes_and_values(shapes_builder, shapes_folder):
  it = pipeline.make_dataset(shapes_builder, "train", batch_size=4, training=True, seed=1,
                             scale_range=(0.8, 1.25), **KW)
  coco = COCO(f"{shapes_folder}/annotations/instances_train.json")
  for _ in range(3):
    batch = next(it)
    assert set(batch) == set(EXPECTED)
    for k, (shape, dtype) in EXPECTED.items():
      assert batch[k].shape == (4,) + shape, k
      assert batch[k].dtype == dtype, k
    for b in range(4):
      n = len(coco.getAnnIds(imgIds=[int(batch["image_id"][b])]))
      kept = batch["gt_valid"][b].sum()
      assert kept + batch["num_dropped"][b] <= n  # the jitter crop may remove objects too
      assert np.all(batch["gt_classes"][b][batch["gt_valid"][b]] >= 1)
      assert np.all(batch["gt_classes"][b][~batch["gt_valid"][b]] == 0)
      h, w = batch["image_size"][b]
      boxes = batch["gt_boxes"][b][batch["gt_valid"][b]]
      assert np.all(boxes[:, 2] <= w + 1e-4) and np.all(boxes[:, 3] <= h + 1e-4)
      assert np.all(batch["image"][b, h:] == 0) and np.all(batch["image"][b, :, w:] == 0)
    assert batch["example_valid"].all()


def test_eval_boxes_map_back_to_the_json(shapes_builder, shapes_folder):
  coco = COCO(f"{shapes_folder}/annotations/instances_val.json")
  batches = list(pipeline.make_dataset(shapes_builder, "validation", batch_size=4,
                                       training=False, **dict(KW, image_size=(100, 100))))
  assert len(batches) == 3                                   # 10 images -> 4 + 4 + 2 (+2 padding)
  assert sorted(_ids(batches)) == sorted(coco.getImgIds())
  np.testing.assert_array_equal(batches[-1]["example_valid"], [True, True, False, False])
  assert np.all(batches[-1]["image"][2:] == 0) and not batches[-1]["gt_valid"][2:].any()
  for batch in batches:
    for b in np.flatnonzero(batch["example_valid"]):
      anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(batch["image_id"][b])]))
      sy, sx = batch["scale"][b]
      np.testing.assert_allclose(batch["scale"][b], 100 / 64, rtol=1e-6)
      np.testing.assert_array_equal(batch["original_size"][b], [64, 64])
      got = batch["gt_boxes"][b][batch["gt_valid"][b]] / np.array([sx, sy, sx, sy])
      want = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
      n = min(len(anns), 5)
      assert batch["gt_valid"][b].sum() == n and batch["num_dropped"][b] == len(anns) - n
      if len(anns) <= 5:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("training", [False, True])
def test_two_hosts_disjoint_and_covering(shapes_builder, training):
  ids = []
  for index in range(2):
    batches = pipeline.make_dataset(shapes_builder, "train", batch_size=1, training=training,
                                    num_epochs=1, drop_remainder=False, process_index=index,
                                    process_count=2, seed=5, **KW)
    ids.append(_ids(batches))
  assert set(ids[0]).isdisjoint(ids[1])
  assert sorted(ids[0] + ids[1]) == list(range(1, 25))
  assert abs(len(ids[0]) - len(ids[1])) <= 1


def test_eval_hosts_get_the_same_number_of_batches(shapes_builder):
  counts, ids = [], []
  for index in range(3):                                    # 10 examples: 4, 3, 3
    batches = list(pipeline.make_dataset(shapes_builder, "validation", batch_size=2,
                                         training=False, process_index=index,
                                         process_count=3, **KW))
    counts.append(len(batches))
    ids += _ids(batches)
  assert counts == [2, 2, 2]
  assert sorted(ids) == list(range(1, 11))
  with pytest.raises(ValueError):
    pipeline.host_split("train", 2, 2)


def test_same_seed_same_batches(shapes_builder):
  def first(seed, n=3):
    it = pipeline.make_dataset(shapes_builder, "train", batch_size=4, training=True, seed=seed,
                               scale_range=(0.5, 1.5), **KW)
    return [next(it) for _ in range(n)]
  a, b, c = first(3), first(3), first(4)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert any(not np.array_equal(x["image_id"], z["image_id"]) or
             not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_training_skips_images_without_objects_unless_asked(coco_builder):
  def ids(**kw):
    batches = pipeline.make_dataset(coco_builder, "train", batch_size=1, training=True,
                                    num_epochs=1, **dict(KW, image_size=(96, 96)), **kw)
    return sorted(_ids(batches))
  assert ids() == [1, 2, 3, 4, 6]              # 5 has no annotation, 7 only a crowd one
  assert ids(keep_empty=True) == [1, 2, 3, 4, 5, 6, 7]
  evals = pipeline.make_dataset(coco_builder, "train", batch_size=8, training=False,
                                **dict(KW, image_size=(96, 96)))
  assert sorted(_ids(evals)) == [1, 2, 3, 4, 5, 6, 7]


def test_too_many_instances_dropped_and_counted(coco_builder):
  batches = pipeline.make_dataset(coco_builder, "train", batch_size=7, training=False,
                                  image_size=(96, 96), max_instances=4, mask_crop_size=8,
                                  max_crowd_instances=1)
  (batch,) = list(batches)
  by_id = {int(i): k for k, i in enumerate(batch["image_id"])}
  six = by_id[6]
  assert batch["gt_valid"][six].all() and batch["num_dropped"][six] == 3
  scale = batch["scale"][six][0]
  widths = (batch["gt_boxes"][six][:, 2] - batch["gt_boxes"][six][:, 0]) / scale
  np.testing.assert_allclose(widths, [5, 6, 7, 8], rtol=1e-5)   # the largest four, in order
  one = by_id[1]
  np.testing.assert_array_equal(batch["gt_valid"][one], [True, True, False, False])
  np.testing.assert_array_equal(batch["crowd_valid"][one], [True])
  five = by_id[5]
  assert not batch["gt_valid"][five].any() and batch["num_dropped"][five] == 0
  seven = by_id[7]
  assert not batch["gt_valid"][seven].any() and batch["crowd_valid"][seven].all()


def test_short_side_resize_and_uint8_masks(coco_builder):
  batches = pipeline.make_dataset(coco_builder, "train", batch_size=7, training=False,
                                  resize="short_side", min_size=50, max_size=80,
                                  image_size=(96, 96), max_instances=8, mask_crop_size=8,
                                  mask_dtype="uint8")
  (batch,) = list(batches)
  assert batch["gt_masks"].dtype == np.uint8 and set(np.unique(batch["gt_masks"])) <= {0, 1}
  from maskrcnn_jax.data import preprocess
  for b in range(7):
    h, w = batch["original_size"][b]
    assert tuple(batch["image_size"][b]) == preprocess.resized_size(h, w, 50, 80)
  with pytest.raises(ValueError, match="resize"):
    pipeline.default_transforms(training=True, resize="nope")
  with pytest.raises(ValueError, match="mask_dtype"):
    pipeline.default_transforms(training=True, mask_dtype="int64")


def test_builder_path_accepted(shapes_builder):
  batch = next(pipeline.make_dataset(str(shapes_builder.data_dir), "validation", batch_size=2,
                                     training=False, **KW))
  assert batch["image"].shape == (2, 64, 64, 3)


def test_uint8_images_are_the_float_images_rounded(shapes_builder):
  """image_dtype='uint8': the resized pixels rounded, zero padding; normalizing them (numpy
  float64, the reference) gives the float32 pipeline's image within half a grey level."""
  kw = dict(batch_size=3, training=False, **KW)
  floats = next(pipeline.make_dataset(shapes_builder, "validation", **kw))
  ints = next(pipeline.make_dataset(shapes_builder, "validation", image_dtype="uint8", **kw))
  assert ints["image"].dtype == np.uint8 and ints["image"].shape == floats["image"].shape
  np.testing.assert_array_equal(ints["image_size"], floats["image_size"])
  mean = np.array([0.485, 0.456, 0.406])
  std = np.array([0.229, 0.224, 0.225])
  for b in range(3):
    h, w = ints["image_size"][b]
    ref = (ints["image"][b, :h, :w] / 255.0 - mean) / std
    np.testing.assert_allclose(floats["image"][b, :h, :w], ref, atol=0.5 / 255 / 0.224 + 1e-5)
    assert np.all(ints["image"][b, h:] == 0) and np.all(ints["image"][b, :, w:] == 0)
  for k in floats:
    if k != "image":
      np.testing.assert_array_equal(ints[k], floats[k], err_msg=k)
  with pytest.raises(ValueError, match="image_dtype"):
    pipeline.default_transforms(training=True, image_dtype="float16")
