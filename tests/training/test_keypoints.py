"""Keypoint R-CNN end to end on the synthetic stick figures (configs/keypoints_shapes.py's model,
slimmed, on 64 px figures): the short version of the keypoint demo trains, evaluates OKS keypoint
AP into metrics.json, and draws skeletons; bad inputs stop with one line."""
import json
import math
import os

import pytest

from configs import keypoints_shapes
from maskrcnn_jax.evaluation import coco_eval, evaluator
from maskrcnn_jax.training import data_source, trainer
from maskrcnn_jax.training.errors import ConfigError
from tests.training import common


@pytest.fixture(scope="module")
def figures_cache(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("keypoint_shapes") / "figures")
  data_source.prepare_builder(_config(cache).data)
  return cache


def _config(cache, **overrides):
  """configs/keypoints_shapes.py with common.make_config's small model, 64 px figures."""
  c = common.make_config(cache, {"training.steps": 2, "training.checkpoint_every": 2,
                                 "training.log_every": 1, "training.eval_every": 2, **overrides})
  k = keypoints_shapes.get_config()
  c.model.num_classes = k.model.num_classes
  c.model.mask_on = False
  c.model.keypoint_head.update(dict(k.model.keypoint_head, conv_layers=(16, 16)))
  c.model.keypoint_sampler.num_rois = 8
  c.data.dataset = "keypoint_shapes"
  c.data.keypoint_shapes.update(dict(num_train=8, num_val=3, seed=1, image_size=64))
  c.data.max_instances = 4
  return c


@pytest.mark.slow
def test_keypoint_model_trains_and_evaluates(figures_cache, tmp_path):
  config = _config(figures_cache)
  metrics = []
  state = trainer.train_and_evaluate(
      config, str(tmp_path), hooks=[lambda step, state, m, batch: metrics.append(m)],
      evaluate=evaluator.make_training_evaluator(config, num_pictures=1))
  assert int(state.step) == 2
  assert math.isfinite(float(metrics[-1]["loss_keypoint"])) and metrics[-1]["loss_keypoint"] > 0
  out = tmp_path / "eval" / "step_2"
  summary = json.loads((out / "metrics.json").read_text())
  assert set(summary) >= {"bbox", "keypoints"} and "segm" not in summary
  assert set(coco_eval.KEYPOINT_STAT_NAMES) <= set(summary["keypoints"])
  records = json.loads((out / "results.json").read_text())
  assert records and all(len(r["keypoints"]) == 3 * 11 for r in records)
  assert len(os.listdir(out / "pictures")) == 1


def test_keypoint_model_on_a_dataset_without_keypoints_is_one_line(shapes_cache, tmp_path):
  config = common.make_config(shapes_cache, {"training.steps": 1})
  config.model.keypoint_head.update(dict(type="rcnn", num_keypoints=11, conv_layers=(16,)))
  config.model.keypoint_sampler.num_rois = 8
  with pytest.raises(ConfigError, match="no keypoints") as e:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert len(str(e.value).splitlines()) == 1


def test_keypoint_count_differing_from_the_config_is_one_line(figures_cache, tmp_path):
  config = _config(figures_cache, **{"training.steps": 1})
  config.model.keypoint_head.num_keypoints = 17
  with pytest.raises(ConfigError, match="num_keypoints=17") as e:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert len(str(e.value).splitlines()) == 1
