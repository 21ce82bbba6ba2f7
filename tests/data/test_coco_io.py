"""Bad data: every case gives a clear error or a counted, reported skip (or fix)."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_jax.data import coco_io

H, W = 24, 32


def _square(x, y, s):
  return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def _run(tmp_path, images, annotations, files=None, categories=None):
  """Writes images (name -> array or bytes) and a JSON, returns (examples, report)."""
  img_dir = tmp_path / "img"
  img_dir.mkdir(exist_ok=True)
  for name, content in (files or {}).items():
    if isinstance(content, bytes):
      (img_dir / name).write_bytes(content)
    else:
      Image.fromarray(content).save(img_dir / name)
  data = {"images": images, "annotations": annotations,
          "categories": categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
  ann_file = tmp_path / "ann.json"
  ann_file.write_text(json.dumps(data))
  data = coco_io.load_annotations(str(ann_file))
  cats = coco_io.read_categories([data])
  report = coco_io.SplitReport(split="train")
  examples = dict(coco_io.iter_examples(data, str(img_dir), cats, report))
  return examples, report


def _img(image_id, name="x.png", w=W, h=H):
  return {"id": image_id, "file_name": name, "width": w, "height": h}


def _ann(ann_id, image_id=1, cat=1, seg=None, bbox=(2, 2, 6, 6), crowd=0):
  a = {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": crowd,
       "segmentation": _square(2, 2, 6) if seg is None else seg}
  if bbox is not None:
    a["bbox"] = list(bbox)
  return a


RGB = np.full((H, W, 3), 128, np.uint8)


def test_missing_and_unreadable_images(tmp_path):
  png = (tmp_path / "tmp.png")
  Image.fromarray(RGB).save(png)
  truncated = png.read_bytes()[:60]
  examples, report = _run(
      tmp_path, [_img(1, "ok.png"), _img(2, "missing.png"), _img(3, "garbage.jpg"),
                 _img(4, "trunc.png")],
      [_ann(1, 1), _ann(2, 2), _ann(3, 3), _ann(4, 4)],
      files={"ok.png": RGB, "garbage.jpg": b"not an image at all", "trunc.png": truncated})
  assert sorted(examples) == [1]
  assert report.skipped == {"missing_image": 1, "unreadable_image": 2}
  assert any("missing.png" in e for e in report.examples["missing_image"])
  assert report.images_written == 1 and report.annotations_written == 1


def test_size_mismatch_and_duplicate_image_ids(tmp_path):
  examples, report = _run(
      tmp_path, [_img(1, "ok.png"), _img(2, "ok.png", w=W + 1), _img(1, "ok.png")], [_ann(1, 1)],
      files={"ok.png": RGB})
  assert sorted(examples) == [1]
  assert report.skipped == {"size_mismatch": 1, "duplicate_image_id": 1}


def test_unknown_image_and_category(tmp_path):
  examples, report = _run(tmp_path, [_img(1)], [_ann(1, 1), _ann(2, 99), _ann(3, 1, cat=7)],
                          files={"x.png": RGB})
  assert list(examples[1]["objects"]["id"]) == [1]
  assert report.skipped == {"unknown_image": 1, "unknown_category": 1}
  assert report.examples["unknown_image"] == [2]
  assert report.examples["unknown_category"] == [3]


def test_degenerate_polygons(tmp_path):
  good = _square(10, 10, 5)[0]
  anns = [
      _ann(1, seg=[good, [1, 1, 3, 3]], bbox=(10, 10, 5, 5)),     # one 2-point polygon dropped
      _ann(2, seg=[[1, 1, 3, 3], [1, 2, 3]], bbox=(1, 1, 2, 2)),  # nothing left
      _ann(3, seg=[[1, 1, 3, 3, float("nan"), 4]], bbox=(1, 1, 2, 2)),
      _ann(4, seg=[[5, 5, 10, 5, 15, 5]], bbox=(5, 5, 10, 1)),    # collinear: no pixel
      _ann(5, seg=[], bbox=(1, 1, 2, 2)),
  ]
  examples, report = _run(tmp_path, [_img(1)], anns, files={"x.png": RGB})
  objs = examples[1]["objects"]
  assert objs["id"] == [1]
  mask = coco_io.decode_rle(examples[1]["mask_rle"], H, W)
  expect = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([good], H, W)))
  np.testing.assert_array_equal(mask, expect)
  assert report.fixed == {"degenerate_polygon": 4}
  assert report.skipped == {"empty_segmentation": 3, "empty_mask": 1}


def test_bad_rle_and_missing_segmentation(tmp_path):
  m = np.zeros((H, W), np.uint8)
  m[3:9, 4:12] = 1
  rle = mask_utils.encode(np.asfortranarray(m))
  wrong_size = {"size": [H + 1, W], "counts": rle["counts"].decode()}
  bad_sum = {"size": [H, W], "counts": [5, 3, 2]}
  anns = [_ann(1, seg={"size": [H, W], "counts": rle["counts"].decode()}, bbox=(4, 3, 8, 6)),
          _ann(2, seg=wrong_size), _ann(3, seg=bad_sum), _ann(4, seg=None),
          _ann(5, seg={"foo": 1})]
  anns[3]["segmentation"] = None
  examples, report = _run(tmp_path, [_img(1)], anns, files={"x.png": RGB})
  assert examples[1]["objects"]["id"] == [1]
  np.testing.assert_array_equal(coco_io.decode_rle(examples[1]["mask_rle"], H, W), m)
  assert report.skipped == {"rle_size_mismatch": 2, "missing_segmentation": 2}


def test_boxes_zero_area_clipped_outside_missing(tmp_path):
  anns = [
      _ann(1, bbox=(2, 2, 0, 6)),            # zero width
      _ann(2, bbox=(2, 2, 6, -1)),           # negative height
      _ann(3, bbox=(-3, 20, 10, 10)),        # partly outside: clipped to (0, 20, 7, 24)
      _ann(4, bbox=(40, 2, 5, 5)),           # entirely outside (x >= W)
      _ann(5, bbox=None),                    # missing: from the mask
      _ann(6, bbox=("a", 1, 2, 3)),          # malformed
  ]
  examples, report = _run(tmp_path, [_img(1)], anns, files={"x.png": RGB})
  objs = examples[1]["objects"]
  assert objs["id"] == [3, 5]
  np.testing.assert_array_equal(objs["bbox_xyxy"][0], [0, 20, 7, 24])
  # The square polygon (2,2)-(8,8) rasterizes to pixels 2..8 (pycocotools includes the far edge).
  mask = coco_io.decode_rle(examples[1]["mask_rle"][objs["mask_rle_length"][0]:], H, W)
  ys, xs = np.nonzero(mask)
  np.testing.assert_array_equal(objs["bbox_xyxy"][1], [xs.min(), ys.min(), xs.max() + 1,
                                                       ys.max() + 1])
  assert report.skipped == {"zero_area_box": 3, "box_outside_image": 1}
  assert report.fixed == {"clipped_box": 1, "bbox_from_mask": 1}


def test_image_modes_converted_to_rgb(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  files = {}
  modes = {"l.png": "L", "la.png": "LA", "rgba.png": "RGBA", "p.png": "P", "cmyk.jpg": "CMYK",
           "i16.png": "I;16"}
  for name, mode in modes.items():
    if mode == "I;16":
      img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
      assert img.mode == "I;16"
    else:
      img = Image.fromarray(rgb).convert(mode)
    path = tmp_path / name
    img.save(path, format="JPEG" if name.endswith("jpg") else "PNG")
    files[name] = path.read_bytes()
  images = [_img(i + 1, name) for i, name in enumerate(modes)]
  examples, report = _run(tmp_path, images, [], files=files)
  assert len(examples) == len(modes)
  import io
  for i, name in enumerate(modes):
    ex = examples[i + 1]
    dec = np.asarray(Image.open(io.BytesIO(ex["image"])))
    assert dec.shape == (H, W, 3), name
    if modes[name] == "I;16":
      np.testing.assert_array_equal(dec, np.repeat(rgb[..., :1], 3, axis=-1))
    else:
      np.testing.assert_array_equal(dec, np.asarray(Image.open(io.BytesIO(files[name])).convert(
          "RGB")))
  assert sum(report.converted.values()) == len(modes)
  assert report.images_without_annotations == len(modes)


def test_malformed_json_and_category_conflicts(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"annotations": []}))
  with pytest.raises(ValueError, match="images"):
    coco_io.load_annotations(str(bad))
  bad.write_text("[1, 2]")
  with pytest.raises(ValueError, match="JSON object"):
    coco_io.load_annotations(str(bad))
  a = {"images": [], "categories": [{"id": 1, "name": "x"}]}
  b = {"images": [], "categories": [{"id": 1, "name": "y"}]}
  with pytest.raises(ValueError, match="category id 1"):
    coco_io.read_categories([a, b])
  with pytest.raises(ValueError, match="no categories"):
    coco_io.read_categories([{"images": [], "categories": []}])
  dup = coco_io.read_categories([{"categories": [{"id": 3, "name": "x"}, {"id": 1, "name": "x"},
                                                 {"id": 2, "name": "z"}]}])
  assert [(c.label, c.category_id, c.name) for c in dup] == [(0, 1, "x_1"), (1, 2, "z"),
                                                             (2, 3, "x_3")]


def test_rle_round_trip_edge_cases():
  rng = np.random.default_rng(1)
  cases = [np.zeros((5, 7)), np.ones((5, 7)), rng.random((13, 11)) > 0.5,
           np.eye(6, 9), np.pad(np.ones((1, 1)), ((0, 4), (2, 0)))]
  for m in cases:
    m = m.astype(np.uint8)
    counts = coco_io.encode_rle(m)
    assert counts.sum() == m.size and counts.dtype == np.int32
    np.testing.assert_array_equal(coco_io.decode_rle(counts, *m.shape), m)
    expect = mask_utils.decode(mask_utils.frPyObjects(
        {"size": list(m.shape), "counts": [int(c) for c in counts]}, *m.shape))
    np.testing.assert_array_equal(expect, m)
  with pytest.raises(ValueError):
    coco_io.decode_rle([3, 4], 2, 2)


def test_report_summary_lists_everything(tmp_path):
  _, report = _run(tmp_path, [_img(1), _img(2, "none.png")], [_ann(1, 1, bbox=(-2, 0, 5, 5))],
                   files={"x.png": RGB})
  text = report.summary()
  assert "missing_image=1" in text and "clipped_box=1" in text
  assert "1 written of 2" in text
  assert json.loads(json.dumps(report.to_dict()))["skipped"] == {"missing_image": 1}
  assert os.path.basename(report.examples["missing_image"][0]) == "none.png"
