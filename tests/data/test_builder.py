"""The tfds builder: round trip against pycocotools, metadata, reuse of prepared data."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn_jax.data import builder as builder_lib, coco_io


def _examples(builder, split="train"):
  import tensorflow_datasets as tfds
  return {int(ex["image/id"]): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def test_round_trip_matches_pycocotools(coco_builder, coco_folder, tf_quiet):
  """Masks equal annToMask pixel for pixel; boxes, labels, category ids equal the JSON."""
  tf = tf_quiet
  from maskrcnn_jax.data import transforms
  coco = COCO(coco_folder["annotation_file"])
  cat_ids = sorted(coco.getCatIds())
  examples = _examples(coco_builder)
  assert sorted(examples) == sorted(coco.getImgIds())  # the image without annotations is kept
  n_checked = 0
  for image_id, ex in examples.items():
    info = coco.imgs[image_id]
    h, w = info["height"], info["width"]
    assert ex["image"].shape == (h, w, 3) and ex["image"].dtype == np.uint8
    assert tuple(ex["image/size"]) == (h, w)
    assert ex["image/filename"].decode() == info["file_name"]
    # Pixels: PNG and converted images equal PIL's RGB conversion; RGB JPEGs are stored as they are.
    path = os.path.join(coco_folder["image_dir"], info["file_name"])
    pil = Image.open(path)
    if pil.format == "JPEG" and pil.mode == "RGB":
      with open(path, "rb") as f:
        expect = tf.io.decode_jpeg(f.read(), channels=3).numpy()
    else:
      expect = np.asarray(pil.convert("RGB"))
    np.testing.assert_array_equal(ex["image"], expect)

    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    objs = ex["objects"]
    assert list(objs["id"]) == [a["id"] for a in anns]
    assert list(objs["category_id"]) == [a["category_id"] for a in anns]
    assert list(objs["label"]) == [cat_ids.index(a["category_id"]) for a in anns]
    assert list(objs["is_crowd"]) == [bool(a["iscrowd"]) for a in anns]
    np.testing.assert_allclose(objs["area"], [a["area"] for a in anns], rtol=1e-6)
    expect_xyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in
                            (a["bbox"] for a in anns)], np.float32).reshape(-1, 4)
    np.testing.assert_allclose(objs["bbox_xyxy"], expect_xyxy, rtol=0, atol=1e-5)
    if len(anns):
      norm = expect_xyxy[:, [1, 0, 3, 2]] / np.array([h, w, h, w], np.float32)
      np.testing.assert_allclose(objs["bbox"], norm, rtol=0, atol=1e-6)
    # Masks, numpy decoder and the pipeline's TF decoder.
    lengths = objs["mask_rle_length"]
    assert lengths.sum() == ex["mask_rle"].size
    tf_masks = transforms.decode_rle(ex["mask_rle"], lengths, h, w).numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for k, ann in enumerate(anns):
      expect = coco.annToMask(ann)
      got = coco_io.decode_rle(ex["mask_rle"][starts[k]:starts[k + 1]], h, w)
      np.testing.assert_array_equal(got, expect)
      np.testing.assert_array_equal(tf_masks[k], expect)
      n_checked += 1
  assert n_checked == len(coco.dataset["annotations"])
  seg_kinds = {("poly" if isinstance(a["segmentation"], list) else
                "rle_" + type(a["segmentation"]["counts"]).__name__, a["iscrowd"])
               for a in coco.dataset["annotations"]}
  assert {("poly", 0), ("rle_str", 0), ("rle_list", 0), ("rle_list", 1)} <= seg_kinds


def test_metadata_categories_and_report(coco_builder):
  labels = coco_builder.info.features["objects"]["label"]
  assert labels.names == ["cat", "dog", "zebra"]
  cats = builder_lib.load_categories(coco_builder)
  assert [(c["label"], c["contiguous_id"], c["category_id"], c["name"]) for c in cats] == [
      (0, 1, 1, "cat"), (1, 2, 5, "dog"), (2, 3, 90, "zebra")]
  report = builder_lib.load_skip_report(coco_builder)["train"]
  assert report["images_written"] == 7 and report["images_in_json"] == 7
  assert report["annotations_written"] == 16 and report["crowd_annotations_written"] == 2
  assert report["images_without_annotations"] == 1
  assert report["converted"] == {"converted_L": 1, "converted_RGBA": 1, "converted_CMYK": 1,
                                 "converted_P": 1}
  assert report["skipped"] == {}


def test_second_call_reuses_prepared_data(coco_builder, coco_folder, monkeypatch):
  from maskrcnn_jax.data import prepare_coco_format
  info_file = os.path.join(coco_builder.data_dir, "dataset_info.json")
  before = os.stat(info_file).st_mtime_ns

  def boom(*args, **kwargs):
    raise AssertionError("rebuilt")
  monkeypatch.setattr(coco_io, "iter_examples", boom)
  monkeypatch.setattr(coco_io, "load_annotations", boom)
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(str(coco_builder.data_dir))))
  again = prepare_coco_format(
      {"train": (coco_folder["image_dir"], coco_folder["annotation_file"])}, data_dir)
  assert str(again.data_dir) == str(coco_builder.data_dir)
  assert os.stat(info_file).st_mtime_ns == before
  assert again.info.splits["train"].num_examples == 7
  assert again.info.features["objects"]["label"].names == ["cat", "dog", "zebra"]


def test_config_name_tracks_inputs(coco_folder, tmp_path):
  splits = builder_lib.resolve_splits(
      {"train": (coco_folder["image_dir"], coco_folder["annotation_file"])})
  name = builder_lib.config_name_for(splits)
  assert name == builder_lib.config_name_for(dict(splits))
  copy = tmp_path / "instances_train.json"
  copy.write_bytes(open(coco_folder["annotation_file"], "rb").read())
  other = builder_lib.resolve_splits({"train": (coco_folder["image_dir"], str(copy))})
  assert builder_lib.config_name_for(other) != name
  os.utime(copy, ns=(1, 1))
  renamed = builder_lib.config_name_for(other)
  os.utime(copy, ns=(2, 2))
  assert builder_lib.config_name_for(other) != renamed


def test_resolve_coco2017_and_folder_layouts(tmp_path):
  root = tmp_path / "coco"
  (root / "annotations").mkdir(parents=True)
  for name in ("train2017", "val2017"):
    (root / name).mkdir()
    (root / "annotations" / f"instances_{name}.json").write_text("{}")
  (root / "annotations" / "person_keypoints_train2017.json").write_text("{}")
  splits = builder_lib.resolve_splits(str(root))
  assert list(splits) == ["train", "validation"]
  assert splits["validation"].image_dir == str(root / "val2017")
  assert splits["train"].annotation_file == str(root / "annotations/instances_train2017.json")

  other = tmp_path / "custom"
  (other / "annotations").mkdir(parents=True)
  for name in ("train", "val"):
    (other / name).mkdir()
    (other / "annotations" / f"instances_{name}.json").write_text("{}")
  assert list(builder_lib.resolve_splits(str(other))) == ["train", "validation"]
  with pytest.raises(ValueError, match="no annotations"):
    builder_lib.resolve_splits(str(tmp_path / "custom" / "train"))
  with pytest.raises(FileNotFoundError):
    builder_lib.resolve_splits({"train": (str(other / "nope"), str(other / "annotations" /
                                                                   "instances_train.json"))})


def test_parallel_workers_give_the_same_examples(coco_folder):
  data = coco_io.load_annotations(coco_folder["annotation_file"])
  cats = coco_io.read_categories([data])
  serial_report = coco_io.SplitReport(split="train")
  serial = list(coco_io.iter_examples(data, coco_folder["image_dir"], cats, serial_report))
  par_report = coco_io.SplitReport(split="train")
  par = list(coco_io.iter_examples(data, coco_folder["image_dir"], cats, par_report,
                                   num_workers=2))
  assert [k for k, _ in serial] == [k for k, _ in par]
  for (_, a), (_, b) in zip(serial, par):
    assert a["image"] == b["image"]
    np.testing.assert_array_equal(a["mask_rle"], b["mask_rle"])
    assert a["objects"]["id"] == b["objects"]["id"]
  assert serial_report.to_dict() == par_report.to_dict()


def test_prepare_prints_and_saves_skip_report(tmp_path, capsys, tf_quiet):
  from maskrcnn_jax.data import prepare_coco_format
  img_dir = tmp_path / "img"
  img_dir.mkdir()
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(img_dir / "ok.png")
  data = {"images": [{"id": 1, "file_name": "ok.png", "width": 30, "height": 20},
                     {"id": 2, "file_name": "missing.png", "width": 30, "height": 20}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                           "bbox": [0, 0, 0, 5], "segmentation": [[0, 0, 5, 0, 5, 5]]},
                          {"id": 2, "image_id": 3, "category_id": 1, "iscrowd": 0,
                           "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5]]}],
          "categories": [{"id": 1, "name": "thing"}]}
  ann = tmp_path / "ann.json"
  ann.write_text(json.dumps(data))
  b = prepare_coco_format({"train": (str(img_dir), str(ann))}, str(tmp_path / "tfds"))
  out = capsys.readouterr().out
  assert "missing_image=1" in out and "unknown_image=1" in out and "zero_area_box=1" in out
  report = json.load(open(os.path.join(b.data_dir, builder_lib.SKIP_REPORT_FILE)))["train"]
  assert report["skipped"] == {"missing_image": 1, "unknown_image": 1, "zero_area_box": 1}
  assert report["images_written"] == 1 and report["images_without_annotations"] == 1
  assert b.info.splits["train"].num_examples == 1
