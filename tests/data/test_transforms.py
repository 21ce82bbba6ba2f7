"""Transforms: eager == tf.data, geometric consistency, padding, crops against references."""
import numpy as np
import pytest
from pycocotools.coco import COCO

from maskrcnn_jax.data import preprocess
from tests.conftest import torch_or_skip

tf = pytest.importorskip("tensorflow")

from maskrcnn_jax.data import transforms as T  # noqa: E402


def _raw_examples(builder, split="train"):
  import tensorflow_datasets as tfds
  ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  out = {}
  for ex in ds:
    ex = dict(ex)
    ex["seed"] = tf.constant([7, int(ex["image/id"])], tf.int64)
    out[int(ex["image/id"])] = ex
  return out


def _both(fn, features):
  """Runs `fn` eagerly and inside tf.data; asserts identical outputs; returns numpy."""
  eager = fn(features)
  graph = next(iter(tf.data.Dataset.from_tensors(features).map(fn)))
  assert set(eager) == set(graph)
  out = {}
  for k in eager:
    e, g = eager[k], graph[k]
    if isinstance(e, tf.RaggedTensor):
      e, g = e.to_tensor(), g.to_tensor()
    np.testing.assert_array_equal(np.asarray(e), np.asarray(g), err_msg=k)
    out[k] = np.asarray(e)
  return out


def _np_crop(mask, box, size):
  """float64 reference: bilinear samples at the crop's bin centres, border clamped."""
  h, w = mask.shape
  x1, y1, x2, y2 = (float(v) for v in box)
  out = np.zeros((size, size))
  for i in range(size):
    y = y1 + (i + 0.5) * (y2 - y1) / size - 0.5
    for j in range(size):
      x = x1 + (j + 0.5) * (x2 - x1) / size - 0.5
      yc, xc = min(max(y, 0.0), h - 1), min(max(x, 0.0), w - 1)
      y0, x0 = int(np.floor(yc)), int(np.floor(xc))
      ya, xa = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      ly, lx = yc - y0, xc - x0
      out[i, j] = ((1 - ly) * ((1 - lx) * mask[y0, x0] + lx * mask[y0, xa]) +
                   ly * ((1 - lx) * mask[ya, x0] + lx * mask[ya, xa]))
  return out


def _tight_box(mask):
  ys, xs = np.nonzero(mask)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


TRANSFORMS = [
    ("resize_short_side", T.resize_short_side(60, 100)),
    ("resize_short_side_multi", T.resize_short_side((40, 50, 60), 100)),
    ("resize_to_fit", T.resize_to_fit((96, 96))),
    ("resize_to_fit_jitter", T.resize_to_fit((96, 96), (0.5, 2.0))),
    ("random_crop", T.random_crop((20, 24))),
    ("random_flip", T.random_flip(0.5)),
    ("flip_left_right", T.flip_left_right),
    ("normalize", T.normalize()),
    ("pad_image", T.pad_image((128, 128))),
    ("pad_instances", T.pad_instances(4, 2)),
    ("binarize_masks", T.binarize_masks()),
    ("select", T.select(("image", "gt_boxes"))),
]


@pytest.mark.parametrize("image_id", [1, 5, 6, 7])
def test_each_transform_eager_equals_tf_data(coco_builder, image_id):
  raw = _raw_examples(coco_builder)[image_id]
  decoded = _both(T.decode_coco_example(16), raw)
  decoded = {k: tf.constant(v) for k, v in decoded.items()}
  for name, fn in TRANSFORMS:
    out = _both(fn, decoded)
    assert "image" in out, name
  chain = T.compose([T.decode_coco_example(16), T.resize_to_fit((80, 80), (0.6, 1.7)),
                     T.random_flip(0.5), T.normalize(), T.pad_image((80, 80)),
                     T.pad_instances(4, 2)])
  out = _both(chain, raw)
  assert out["image"].shape == (80, 80, 3)


def test_decode_splits_crowd_and_crops_masks(coco_builder, coco_folder):
  coco = COCO(coco_folder["annotation_file"])
  raw = _raw_examples(coco_builder)
  for image_id in (1, 3, 6, 7):
    f = T.decode_coco_example(12)(raw[image_id])
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    crowd = [a for a in anns if a["iscrowd"]]
    objs = [a for a in anns if not a["iscrowd"]]
    assert f["gt_boxes"].shape == (len(objs), 4) and f["crowd_boxes"].shape == (len(crowd), 4)
    cat_ids = sorted(coco.getCatIds())
    np.testing.assert_array_equal(f["gt_classes"],
                                  [cat_ids.index(a["category_id"]) + 1 for a in objs])
    for k, a in enumerate(objs):
      x, y, w, h = a["bbox"]
      np.testing.assert_allclose(f["gt_boxes"][k], [x, y, x + w, y + h], atol=1e-5)
      np.testing.assert_allclose(f["gt_masks"][k].numpy(),
                                 _np_crop(coco.annToMask(a), [x, y, x + w, y + h], 12),
                                 rtol=0, atol=1e-5)
    for k, a in enumerate(crowd):
      x, y, w, h = a["bbox"]
      np.testing.assert_allclose(f["crowd_boxes"][k], [x, y, x + w, y + h], atol=1e-5)
    assert tuple(f["original_size"].numpy()) == (coco.imgs[image_id]["height"],
                                                 coco.imgs[image_id]["width"])


def test_crop_and_resize_numpy_reference(rng):
  masks = (rng.random((5, 17, 23)) > 0.5).astype(np.uint8)
  boxes = np.array([[0, 0, 23, 17], [3.3, 2.1, 9.7, 15.2], [22, 16, 23, 17], [0, 5, 1, 6],
                    [10.5, 0, 10.75, 17]], np.float32)
  for size in (1, 7, 28):
    got = T.crop_and_resize(masks, boxes, size).numpy()
    assert got.shape == (5, size, size) and got.dtype == np.float32
    for m in range(5):
      np.testing.assert_allclose(got[m], _np_crop(masks[m], boxes[m], size), rtol=0, atol=1e-5)
  assert T.crop_and_resize(np.zeros((0, 4, 4), np.uint8), np.zeros((0, 4)), 3).shape == (0, 3, 3)


@pytest.mark.reference
def test_crop_and_resize_matches_torchvision_roi_align(rng):
  torch, torchvision = torch_or_skip()
  masks = (rng.random((6, 31, 40)) > 0.4).astype(np.float32)
  x1 = rng.uniform(0, 35, 6)
  y1 = rng.uniform(0, 25, 6)
  boxes = np.stack([x1, y1, np.minimum(x1 + rng.uniform(0.5, 20, 6), 40),
                    np.minimum(y1 + rng.uniform(0.5, 20, 6), 31)], 1).astype(np.float32)
  boxes[0] = [0, 0, 40, 31]
  rois = torch.from_numpy(np.concatenate([np.arange(6)[:, None], boxes], 1).astype(np.float32))
  for size in (14, 28):
    ref = torchvision.ops.roi_align(torch.from_numpy(masks[:, None]), rois, size, 1.0, 1,
                                    aligned=True)
    ref = ref.numpy()[:, 0]                                         # [K, C=1, S, S]
    got = T.crop_and_resize(masks, boxes, size).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_flip_consistent_with_flipped_masks(shapes_builder, shapes_folder):
  """Boxes recomputed from the flipped full masks equal the flipped boxes; crops likewise."""
  coco = COCO(f"{shapes_folder}/annotations/instances_train.json")
  raw = _raw_examples(shapes_builder)
  checked = 0
  for image_id in list(raw)[:6]:
    f = T.decode_coco_example(20)(raw[image_id])
    flipped = _both(T.flip_left_right, f)
    always = _both(T.random_flip(1.0), f)
    never = _both(T.random_flip(0.0), f)
    for k in flipped:
      np.testing.assert_array_equal(always[k], flipped[k])
      np.testing.assert_array_equal(never[k], np.asarray(f[k]))
    np.testing.assert_array_equal(flipped["image"], np.asarray(f["image"])[:, ::-1])
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    for k, a in enumerate(anns):
      full = coco.annToMask(a)[:, ::-1]
      box = _tight_box(full)
      np.testing.assert_allclose(flipped["gt_boxes"][k], box, rtol=0, atol=1e-4)
      np.testing.assert_allclose(flipped["gt_masks"][k], _np_crop(full, box, 20), rtol=0,
                                 atol=1e-5)
      checked += 1
  assert checked >= 6


def test_resize_short_side_matches_torchvision_formula(rng):
  for h, w in ((427, 640), (333, 500), (103, 103)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = np.array([[10.5, 20.25, 200.0, 100.0]], np.float32)
    f = {"image": tf.constant(image), "image_size": tf.constant([h, w]),
         "scale": tf.ones([2]), "gt_boxes": tf.constant(boxes),
         "crowd_boxes": tf.zeros([0, 4]), "gt_masks": tf.zeros([1, 4, 4])}
    out = _both(T.resize_short_side(800, 1333), f)
    nh, nw = preprocess.resized_size(h, w)
    assert out["image"].shape == (nh, nw, 3)
    assert tuple(out["image_size"]) == (nh, nw)
    np.testing.assert_allclose(out["scale"], [nh / h, nw / w], rtol=1e-6)
    np.testing.assert_allclose(out["gt_boxes"], boxes * np.array([nw / w, nh / h] * 2),
                               rtol=1e-6)
    ref = preprocess.resize_bilinear(image.astype(np.float32), nh, nw)
    np.testing.assert_allclose(out["image"], ref, rtol=0, atol=2e-2)  # of 255


def test_resize_to_fit_and_random_crop_geometry(shapes_builder):
  raw = _raw_examples(shapes_builder)
  removed_any = clipped_any = False
  for image_id in list(raw)[:12]:
    f = T.decode_coco_example(56)(raw[image_id])
    fit = _both(T.resize_to_fit((96, 96)), f)
    assert tuple(fit["image_size"]) == (96, 96)                     # 64 x 64 -> long side 96
    np.testing.assert_allclose(fit["gt_boxes"], np.asarray(f["gt_boxes"]) * 1.5, rtol=1e-6)
    np.testing.assert_array_equal(fit["gt_masks"], np.asarray(f["gt_masks"]))
    big = _both(T.resize_to_fit((40, 40), (2.0, 2.0)), f)           # 80 x 80, cut to 40 x 40
    assert tuple(big["image_size"]) == (40, 40) and big["image"].shape == (40, 40, 3)
    b = big["gt_boxes"]
    assert np.all(b >= 0) and np.all(b[:, [0, 2]] <= 40) and np.all(b[:, [1, 3]] <= 40)
    assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
    assert big["gt_masks"].shape[0] == b.shape[0] == big["gt_classes"].shape[0]
    removed_any |= b.shape[0] < f["gt_boxes"].shape[0]
    clipped_any |= bool(np.any(b[:, :2] == 0) | np.any(b[:, 2:] == 40))
  assert removed_any and clipped_any


def test_random_crop_recrops_masks_of_clipped_objects():
  """A clipped object's crop equals (up to resampling) the crop of its full mask at the clipped
  box; the crop offset is read back from an image that encodes pixel coordinates."""
  h, w, size = 60, 80, 56
  yy, xx = np.mgrid[:h, :w]
  full = np.stack([((xx - 30.5) ** 2 + (yy - 25.5) ** 2 < 18 ** 2),
                   (np.abs(xx - 60) < 12) & (np.abs(yy - 40) < 15),
                   (xx < 5) & (yy < 5)]).astype(np.uint8)
  boxes = np.stack([_tight_box(m) for m in full])
  f = {"image": tf.constant(np.stack([yy, xx, np.zeros_like(xx)], -1).astype(np.uint8)),
       "image_size": tf.constant([h, w]), "scale": tf.ones([2]),
       "gt_boxes": tf.constant(boxes), "gt_classes": tf.constant([1, 2, 3]),
       "gt_masks": T.crop_and_resize(full, boxes, size),
       "crowd_boxes": tf.constant([[0.0, 0.0, 80.0, 60.0]])}
  seen_clipped = 0
  for s in range(6):
    g = dict(f)
    g["seed"] = tf.constant([s, 0], tf.int64)
    out = _both(T.random_crop((36, 40)), g)
    oy, ox = (int(v) for v in out["image"][0, 0, :2])
    np.testing.assert_array_equal(out["image"][..., 0], yy[oy:oy + 36, ox:ox + 40])
    np.testing.assert_array_equal(out["crowd_boxes"], [[0, 0, 40, 36]])
    shifted = boxes - np.array([ox, oy, ox, oy], np.float32)
    clipped = np.clip(shifted, 0, [40, 36, 40, 36])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    np.testing.assert_allclose(out["gt_boxes"], clipped[keep], atol=1e-5)
    np.testing.assert_array_equal(out["gt_classes"], np.array([1, 2, 3])[keep])
    for k, j in enumerate(np.flatnonzero(keep)):
      src = clipped[j] + np.array([ox, oy, ox, oy], np.float32)
      ref = _np_crop(full[j], src, size)
      got = out["gt_masks"][k]
      if np.array_equal(clipped[j], shifted[j]):
        np.testing.assert_array_equal(got, np.asarray(f["gt_masks"])[j])
      else:
        seen_clipped += 1
        assert np.abs(got - ref).mean() < 0.03
        assert ((got >= 0.5) != (ref >= 0.5)).mean() < 0.03
  assert seen_clipped >= 3


def test_pad_instances_zero_one_and_too_many():
  def feats(n, crowd=0):
    sizes = np.array([3, 9, 1, 7, 5, 2, 8][:n], np.float32)
    boxes = np.stack([np.zeros(n), np.zeros(n), sizes, np.ones(n)], 1).astype(np.float32)
    return {"gt_boxes": tf.constant(boxes.reshape(-1, 4)),
            "gt_classes": tf.constant(np.arange(1, n + 1, dtype=np.int32)),
            "gt_masks": tf.constant(np.arange(n, dtype=np.float32)[:, None, None] *
                                    np.ones((n, 3, 3), np.float32)),
            "crowd_boxes": tf.constant(np.tile([[0, 0, 2, 2]], (crowd, 1)).astype(np.float32)
                                       .reshape(-1, 4))}
  pad = T.pad_instances(4, 2)
  out = _both(pad, feats(0))
  assert out["gt_boxes"].shape == (4, 4) and out["gt_masks"].shape == (4, 3, 3)
  assert not out["gt_valid"].any() and out["num_dropped"] == 0
  assert not out["crowd_valid"].any() and out["num_crowd_dropped"] == 0
  assert np.all(out["gt_boxes"] == 0) and np.all(out["gt_classes"] == 0)

  out = _both(pad, feats(1, crowd=1))
  np.testing.assert_array_equal(out["gt_valid"], [True, False, False, False])
  np.testing.assert_array_equal(out["gt_classes"], [1, 0, 0, 0])
  np.testing.assert_array_equal(out["crowd_valid"], [True, False])
  assert out["num_dropped"] == 0

  out = _both(pad, feats(7, crowd=3))
  assert out["gt_valid"].all() and out["num_dropped"] == 3
  # The four largest boxes (widths 9, 7, 5, 8 -> objects 2, 4, 5, 7) in their original order.
  np.testing.assert_array_equal(out["gt_classes"], [2, 4, 5, 7])
  np.testing.assert_array_equal(out["gt_masks"][:, 0, 0], [1, 3, 4, 6])
  np.testing.assert_array_equal(out["gt_boxes"][:, 2], [9, 7, 5, 8])
  assert out["crowd_valid"].all() and out["num_crowd_dropped"] == 1


def test_random_transforms_follow_the_seed(coco_builder):
  raw = _raw_examples(coco_builder)[1]
  f = T.decode_coco_example(8)(raw)
  jitter = T.compose([T.resize_to_fit((64, 64), (0.3, 3.0)), T.random_flip(0.5)])
  a = jitter(f)
  b = jitter(dict(f))
  np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
  sizes = set()
  for s in range(8):
    g = dict(f)
    g["seed"] = tf.constant([s, 1], tf.int64)
    sizes.add(tuple(jitter(g)["image_size"].numpy()))
  assert len(sizes) > 1
  with pytest.raises(KeyError, match="seed"):
    T.random_flip()({k: v for k, v in f.items() if k != "seed"})


def test_pad_image_rejects_larger_images():
  f = {"image": tf.zeros([10, 12, 3])}
  out = T.pad_image((16, 16))(f)
  assert out["image"].shape == (16, 16, 3)
  with pytest.raises(tf.errors.InvalidArgumentError):
    T.pad_image((8, 16))(f)


def test_rle_decoders_agree(rng):
  from maskrcnn_jax.data import coco_io
  h, w = 19, 27
  masks = [(rng.random((h, w)) > 0.7), np.ones((h, w)), np.zeros((h, w)), np.eye(h, w)]
  masks[0][0, 0] = True                                          # runs start with a 0-length run
  masks = np.stack(masks).astype(np.uint8)
  runs = [coco_io.encode_rle(m) for m in masks]
  counts = np.concatenate(runs)
  lengths = np.array([r.size for r in runs], np.int32)
  np.testing.assert_array_equal(T.decode_rle(counts, lengths, h, w).numpy(), masks)
  boxes = np.array([[0, 0, 27, 19], [3.5, 2.25, 20.0, 11.0], [1, 1, 2, 2], [20, 0, 27, 19]],
                   np.float32)
  for size in (1, 5, 28):
    direct = T.crop_and_resize_rle(counts, lengths, boxes, h, w, size).numpy()
    np.testing.assert_array_equal(direct, T.crop_and_resize(masks, boxes, size).numpy())
  empty = T.crop_and_resize_rle(np.zeros([0], np.int32), np.zeros([0], np.int32),
                                np.zeros([0, 4], np.float32), h, w, 4)
  assert empty.shape == (0, 4, 4)
  assert T.decode_rle(np.zeros([0], np.int32), np.zeros([0], np.int32), h, w).shape == (0, h, w)
