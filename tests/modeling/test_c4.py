"""ResNet-C4 models (`backbone.type='resnet_c4'`) built from one override of configs/tiny.py: what
the builder derives (one feature level, anchors, poolers, the res5 RoI trunk) and its errors. The
C4 detector itself is checked against torchvision in tests/reference/test_c4_vs_torchvision.py."""
import jax
import pytest
from flax import traverse_util

from configs import tiny
from maskrcnn_jax.modeling.builder import build_model
from maskrcnn_jax.modeling.mask_rcnn import init_variables
from maskrcnn_jax.training.optimizer import trainable_labels


def _c4_config():
  c = tiny.get_config()
  c.model.backbone.type = "resnet_c4"
  return c


def test_one_override_gives_a_c4_model():
  c = _c4_config()
  model = build_model(c.model)
  assert model.levels == (4,) and model.fpn is None and model.roi_trunk is not None
  # tiny.py's per-level FPN anchor sizes, all on C4's one level (15 anchors per location).
  assert model.rpn.anchor_sizes == ((16, 32, 64, 128, 256),)
  assert model.box_pooler.levels == (4,) and model.head("mask_head").pooler.levels == (4,)
  shapes = jax.eval_shape(lambda k: init_variables(model, k), jax.random.key(0))
  paths = {"/".join(p) for p in traverse_util.flatten_dict(shapes["params"])}
  assert not any(p.startswith("fpn/") for p in paths)
  assert not any(p.startswith("backbone/layer4") for p in paths)
  assert "roi_trunk/layer4_0/conv2/kernel" in paths
  width = c.model.backbone.width_per_group
  # res5 keeps its stride 2: pooled 7 x 7 -> 4 x 4, then averaged for the box predictor.
  assert shapes["params"]["box_head"]["fc6"]["kernel"].shape == (width * 32, 64)
  # RPN head on C4 (width * 16 channels), 15 anchors per location.
  assert shapes["params"]["rpn"]["head"]["cls_logits"]["kernel"].shape == (1, 1, 32, 15)


def test_frozen_stages_four_freezes_the_trunk():
  model = build_model(_c4_config().model, frozen_stages=4)
  shapes = jax.eval_shape(lambda k: init_variables(model, k), jax.random.key(0))
  labels = traverse_util.flatten_dict(trainable_labels(shapes["params"], 4))
  assert {v for k, v in labels.items() if k[0] == "roi_trunk"} == {"frozen"}
  assert {v for k, v in labels.items() if k[0] == "box_head"} == {"train"}
  labels = traverse_util.flatten_dict(trainable_labels(shapes["params"], 3))
  assert {v for k, v in labels.items() if k[0] == "roi_trunk"} == {"train"}


def test_c4_errors():
  c = _c4_config()
  c.model.backbone.norm = "bn"
  with pytest.raises(ValueError, match="backbone.norm='bn' cannot normalize a C4 model's") as e:
    build_model(c.model)
  assert len(str(e.value).splitlines()) == 1
  c = _c4_config()
  c.model.box_head.conv_layers = (32,)
  with pytest.raises(ValueError, match="box_head.conv_layers: a C4 model's box head"):
    build_model(c.model)
  c = _c4_config()
  c.model.backbone.stage_blocks = (1, 1, 1)
  with pytest.raises(ValueError, match="stage_blocks needs four counts"):
    build_model(c.model)
  c = _c4_config()
  c.model.backbone.num_stages = 4  # set by the builder from the type, not a config key
  with pytest.raises(ValueError, match="unknown keys"):
    build_model(c.model)
  c = _c4_config()
  c.model.rpn.anchor_sizes = ((16, 32), (64, 128))
  model = build_model(c.model)  # any per-level sizes go to the one level
  assert model.rpn.anchor_sizes == ((16, 32, 64, 128),)

