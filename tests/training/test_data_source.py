"""data_source: the shapes generation parameters name the cache, and a cache made with other
parameters is refused instead of silently reused."""
import json

import pytest

from maskrcnn_jax.training import data_source
from maskrcnn_jax.training.errors import ConfigError
from tests.training import common


def test_every_generation_parameter_names_the_cache():
  base = common.make_config("").data
  dirs = {data_source.shapes_cache_dir(base)}
  for key, value in (("min_visible_fraction", 0.1), ("seed", 7), ("num_val", 5)):
    d = common.make_config("").data
    d.shapes[key] = value
    dirs.add(data_source.shapes_cache_dir(d))
  assert len(dirs) == 4
  assert data_source.shapes_params(base)["min_visible_fraction"] == 0.5


def test_a_cache_made_with_other_parameters_is_refused(tmp_path):
  cache = str(tmp_path / "shapes")
  data = common.make_config(cache).data
  data.shapes.update(dict(num_train=2, num_val=2))
  data_source.prepare_builder(data)
  stored = json.load(open(tmp_path / "shapes" / "shapes.json"))
  assert stored == data_source.shapes_params(data)
  data.shapes.min_visible_fraction = 0.1
  with pytest.raises(ConfigError, match="holds shapes generated with"):
    data_source.prepare_builder(data)


def _keypoint_data(cache):
  data = common.make_config(cache).data
  data.dataset = "keypoint_shapes"
  data.keypoint_shapes.update(dict(num_train=3, num_val=2, image_size=48))
  return data


def test_keypoint_shapes_generated_and_prepared_once_then_reused(tmp_path, monkeypatch):
  from maskrcnn_jax.data import builder as builder_lib, coco_io
  cache = tmp_path / "figures"
  data = _keypoint_data(str(cache))
  builder = data_source.prepare_builder(data)
  assert json.load(open(cache / "keypoint_shapes.json")) == data_source.keypoint_shapes_params(data)
  assert (cache / "annotations" / "person_keypoints_train.json").is_file()
  assert builder.info.splits["train"].num_examples == 3
  assert builder.info.splits["validation"].num_examples == 2
  assert builder_lib.load_keypoint_info(builder)["names"][:2] == ["head", "neck"]

  def boom(*args, **kwargs):
    raise AssertionError("generated or prepared again")
  monkeypatch.setattr(data_source, "generate_keypoint_shapes", boom)
  monkeypatch.setattr(coco_io, "iter_examples", boom)
  again = data_source.prepare_builder(data)
  assert str(again.data_dir) == str(builder.data_dir)
  data.keypoint_shapes.max_overlap = 0.5
  with pytest.raises(ConfigError, match="holds keypoint_shapes generated with"):
    data_source.prepare_builder(data)


def test_synthetic_caches_are_named_per_kind_and_never_mixed(tmp_path):
  data = common.make_config("").data
  shapes_dir = data_source.shapes_cache_dir(data)
  data.dataset = "keypoint_shapes"
  kp_dir = data_source.shapes_cache_dir(data)
  assert "keypoint_shapes-" in kp_dir and "/shapes-" in shapes_dir
  data.keypoint_shapes.seed = 9
  assert data_source.shapes_cache_dir(data) != kp_dir
  # A shapes cache is not overwritten by keypoint figures asked for in the same folder.
  cache = tmp_path / "shared"
  (cache / "annotations").mkdir(parents=True)
  (cache / "shapes.json").write_text("{}")
  with pytest.raises(ConfigError, match="holds no keypoint_shapes.json"):
    data_source.prepare_builder(_keypoint_data(str(cache)))
  assert (cache / "shapes.json").is_file()


def test_coco_format_annotations_pick_the_files(tmp_path):
  """One folder with instances_train.json (no keypoints) and person_keypoints_train.json:
  config.data.annotations chooses, and only the keypoint one has keypoint features."""
  from maskrcnn_jax.data import keypoint_shapes
  root = tmp_path / "coco"
  keypoint_shapes.generate_keypoint_shapes(str(root), 2, 0, seed=1, image_size=32)
  kp = json.load(open(root / "annotations" / "person_keypoints_train.json"))
  kp["categories"] = [{"id": 1, "name": "figure"}]
  (root / "annotations" / "instances_train.json").write_text(json.dumps(kp))
  data = common.make_config("").data
  data.dataset = "coco_format"
  data.root = str(root)
  data.tfds_dir = str(tmp_path / "tfds")
  found = {}
  for annotations in ("instances", "person_keypoints"):
    data.annotations = annotations
    b = data_source.prepare_builder(data)
    found[annotations] = "keypoints" in b.info.features["objects"].feature.keys()
  assert found == {"instances": False, "person_keypoints": True}
  data.annotations = "captions"
  with pytest.raises(ConfigError, match="annotations must be one of"):
    data_source.prepare_builder(data)


def test_validation_and_keypoint_options_reach_the_pipeline(monkeypatch):
  data = common.make_config("").data
  data.dataset = "nope"
  with pytest.raises(ConfigError, match="keypoint_shapes"):
    data_source.validate(data)
  data = _keypoint_data("")
  data.keypoint_shapes["num_figures"] = 3
  with pytest.raises(ConfigError, match="config.data.keypoint_shapes has unknown keys"):
    data_source.validate(data)
  data = _keypoint_data("")
  data.min_keypoints_per_image = -1
  with pytest.raises(ConfigError, match="min_keypoints_per_image"):
    data_source.validate(data)
  data.min_keypoints_per_image = 10
  data.keypoint_flip_permutation = (0, 0)
  with pytest.raises(ConfigError, match="not a permutation"):
    data_source.validate(data)
  data.keypoint_flip_permutation = (1, 0)
  seen = {}
  monkeypatch.setattr(data_source, "make_dataset", lambda *a, **kw: seen.update(kw))
  data_source.train_iterator("builder", data, 2, 0, 0)
  assert seen["min_keypoints_per_image"] == 10 and seen["keypoint_flip_permutation"] == (1, 0)
  data.keypoint_flip_permutation = ()
  data_source.train_iterator("builder", data, 2, 0, 0)
  assert seen["keypoint_flip_permutation"] is None
