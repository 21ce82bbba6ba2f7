"""Starting weights: torchvision ImageNet ResNets and torchvision Mask R-CNN checkpoints (with
other num_classes) laid over a random initialization."""
import logging

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import base
from maskrcnn_jax.convert import torchvision as tv_convert
from maskrcnn_jax.modeling.builder import build_model
from maskrcnn_jax.training import initialization
from tests.conftest import torch_or_skip


def _model(num_classes=91):
  cfg = base.get_config()
  cfg.model.num_classes = num_classes
  return build_model(cfg.model)


_random_variables = initialization.random_variables


def _fake_random_variables(model, seed):
  """Stands in for `random_variables` (whose compilation the full-size model would make slow)."""
  shapes = jax.eval_shape(lambda: _random_variables(model, seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_random_variables_cover_the_model():
  """The cheap initialization creates exactly the variables a full `model.init` creates."""
  model = _model(4)
  ours = jax.eval_shape(lambda: initialization.random_variables(model, 0))
  full = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32),
                        np.array([[64, 64]]), np.array([[64, 64]]))
  for col in ("params", "batch_stats"):
    a = {k: v.shape for k, v in traverse_util.flatten_dict(ours[col]).items()}
    b = {k: v.shape for k, v in traverse_util.flatten_dict(full[col]).items()}
    assert a == b


@pytest.mark.reference
def test_imagenet_resnet50_state_dict_fills_the_backbone():
  torch, tv = torch_or_skip()
  torch.manual_seed(0)
  net = tv.models.resnet50(weights=None)
  for m in net.modules():  # non-trivial BN statistics
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-1, 1)
      m.running_var.uniform_(0.5, 2)
  sd = net.state_dict()
  model = _model()
  v = tv_convert.variables_from_resnet_state_dict(model, sd)
  shapes = jax.eval_shape(lambda: initialization.random_variables(model, 0))
  for col in ("params", "batch_stats"):
    assert (set(traverse_util.flatten_dict(v[col])) ==
            set(traverse_util.flatten_dict({"backbone": shapes[col]["backbone"]})))
  bb, stats = v["params"]["backbone"], v["batch_stats"]["backbone"]
  np.testing.assert_array_equal(bb["conv1"]["kernel"],
                                sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(bb["layer3_5"]["conv2"]["kernel"],
                                sd["layer3.5.conv2.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(bb["layer2_0"]["downsample_conv"]["kernel"],
                                sd["layer2.0.downsample.0.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats["layer1_0"]["bn1"]["running_mean"],
                                sd["layer1.0.bn1.running_mean"].numpy())
  np.testing.assert_array_equal(stats["layer4_2"]["bn3"]["running_var"],
                                sd["layer4.2.bn3.running_var"].numpy())
  np.testing.assert_array_equal(stats["layer4_0"]["downsample_bn"]["weight"],
                                sd["layer4.0.downsample.1.weight"].numpy())

  broken = dict(sd)
  del broken["layer1.0.conv1.weight"]
  broken["layer9.weight"] = sd["fc.bias"]
  with pytest.raises(ValueError, match=r"missing keys \(1\): layer1\.0\.conv1\.weight") as e:
    tv_convert.variables_from_resnet_state_dict(model, broken)
  assert "layer9.weight" in str(e.value) and "fc.weight" not in str(e.value)


@pytest.mark.reference
def test_imagenet_resnet50_fills_a_c4_model_trunk_with_layer4():
  """C4 models: layer1..3 go to the backbone, layer4 to the res5 RoI trunk; nothing is left."""
  torch, tv = torch_or_skip()
  torch.manual_seed(0)
  sd = tv.models.resnet50(weights=None).state_dict()
  cfg = base.get_config()
  cfg.model.backbone.type = "resnet_c4"
  model = build_model(cfg.model)
  v = tv_convert.variables_from_resnet_state_dict(model, sd)
  assert sorted(v["params"]) == ["backbone", "roi_trunk"]
  assert not any(k.startswith("layer4") for k in v["params"]["backbone"])
  np.testing.assert_array_equal(v["params"]["roi_trunk"]["layer4_2"]["conv3"]["kernel"],
                                sd["layer4.2.conv3.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["batch_stats"]["roi_trunk"]["layer4_0"]["bn1"]["running_var"],
                                sd["layer4.0.bn1.running_var"].numpy())


@pytest.mark.reference
def test_imagenet_init_keeps_heads_random(tmp_path, monkeypatch):
  torch, tv = torch_or_skip()
  path = str(tmp_path / "resnet50.pth")
  sd = tv.models.resnet50(weights=None).state_dict()
  torch.save(sd, path)
  monkeypatch.setattr(initialization, "random_variables", _fake_random_variables)
  model = _model(4)
  v = initialization.initial_variables(model, {"imagenet_resnet": path}, 0)
  fake = _fake_random_variables(model, 0)
  np.testing.assert_array_equal(v["params"]["backbone"]["layer1_0"]["conv1"]["kernel"],
                                sd["layer1.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["fpn"]["inner_blocks_0"]["kernel"],
                                fake["params"]["fpn"]["inner_blocks_0"]["kernel"])


@pytest.mark.reference
def test_torchvision_maskrcnn_with_other_num_classes(tmp_path, monkeypatch, caplog):
  """A 91-class torchvision checkpoint into a 4-class model: everything but the class-dependent
  predictors is loaded; those keep their random values and are reported."""
  torch, tv = torch_or_skip()
  torch.manual_seed(0)
  tv_model = tv.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
  sd = tv_model.state_dict()
  path = str(tmp_path / "maskrcnn.pth")
  torch.save(sd, path)
  monkeypatch.setattr(initialization, "random_variables", _fake_random_variables)
  model = _model(4)
  with caplog.at_level(logging.WARNING):
    v = initialization.initial_variables(model, {"torchvision_checkpoint": path}, 0)
  report = v.pop("init_report")
  fake = _fake_random_variables(model, 0)
  reinit = {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
            "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
            "roi_heads.mask_predictor.mask_fcn_logits.weight",
            "roi_heads.mask_predictor.mask_fcn_logits.bias"}
  assert {s.split(" ")[0] for s in report["mis-shaped"]} == reinit
  assert report["missing"] == [] and report["unexpected"] == []
  p = v["params"]
  np.testing.assert_array_equal(p["box_head"]["cls_score"]["kernel"],
                                fake["params"]["box_head"]["cls_score"]["kernel"])
  np.testing.assert_array_equal(p["mask_head"]["mask_fcn_logits"]["bias"],
                                fake["params"]["mask_head"]["mask_fcn_logits"]["bias"])
  np.testing.assert_array_equal(p["box_head"]["fc7"]["kernel"],
                                sd["roi_heads.box_head.fc7.weight"].numpy().T)
  rpn_conv = "rpn.head.conv.0.0.bias" if "rpn.head.conv.0.0.bias" in sd else "rpn.head.conv.bias"
  np.testing.assert_array_equal(p["rpn"]["head"]["conv"]["bias"], sd[rpn_conv].numpy())
  np.testing.assert_array_equal(v["batch_stats"]["backbone"]["bn1"]["running_var"],
                                sd["backbone.body.bn1.running_var"].numpy())
  assert any("cls_score" in r.getMessage() and "re-initialized" in r.getMessage()
             for r in caplog.records)


def test_both_init_sources_is_an_error():
  with pytest.raises(ValueError, match="only one"):
    initialization.initial_variables(_model(), {"imagenet_resnet": "a.pth",
                                                "torchvision_checkpoint": "b.pth"}, 0)
