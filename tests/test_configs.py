"""Every file in configs/ loads, passes the trainer's validation and builds its model and optimizer
state (shapes only), so a typo in a config fails here and not at the start of a run."""
import glob
import os

import jax
import pytest

from maskrcnn_jax.modeling import build_model
from maskrcnn_jax.training import optimizer, parallel, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def test_every_config_is_listed():
  assert {"base", "shapes", "tiny", "torchvision_r50_fpn", "r50_fpn_coco",
          "torchvision_fasterrcnn_r50_fpn", "torchvision_fasterrcnn_r50_fpn_v2",
          "torchvision_maskrcnn_r50_fpn_v2"} <= set(CONFIGS)


@pytest.mark.reference
@pytest.mark.parametrize("name,constructor", [
    ("torchvision_r50_fpn", "maskrcnn_resnet50_fpn"),
    ("torchvision_fasterrcnn_r50_fpn", "fasterrcnn_resnet50_fpn"),
    ("torchvision_fasterrcnn_r50_fpn_v2", "fasterrcnn_resnet50_fpn_v2"),
    ("torchvision_maskrcnn_r50_fpn_v2", "maskrcnn_resnet50_fpn_v2"),
    ("torchvision_keypointrcnn_r50_fpn", "keypointrcnn_resnet50_fpn")])
def test_torchvision_configs_are_the_models_from_torchvision_builds(name, constructor):
  """Each torchvision config builds the model `from_torchvision` makes of that constructor's
  state_dict: what `describe_state_dict` reads from torchvision's own keys and shapes is what the
  config file says."""
  import importlib

  from maskrcnn_jax.convert.torchvision import describe_state_dict
  from maskrcnn_jax.modeling import torchvision_model_config
  from tests.conftest import torch_or_skip
  torch_or_skip()
  import torchvision
  sd = getattr(torchvision.models.detection, constructor)(weights=None,
                                                          weights_backbone=None).state_dict()
  desc = describe_state_dict(sd)
  keypoints = constructor.startswith("keypoint")
  assert desc == dict(version=2 if constructor.endswith("_v2") else 1, depth=50,
                      mask=constructor.startswith("mask"), num_classes=2 if keypoints else 91,
                      keypoints=17 if keypoints else 0,
                      keypoint_layers=(512,) * 8 if keypoints else ())
  model = build_model(importlib.import_module(f"configs.{name}").get_config().model)
  assert model == build_model(torchvision_model_config(
      desc["depth"], desc["num_classes"], desc["version"], desc["mask"], desc["keypoints"]))
  assert model.head_names == (("mask_head",) if desc["mask"] else
                              ("keypoint_head",) if keypoints else ())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_builds(name, tmp_path):
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.data.dataset == "coco_format":
    config.data.root = str(tmp_path)  # the one field a COCO config leaves to the command line
  trainer.validate_config(config)
  model = build_model(config.model)
  state = trainer.abstract_train_state(
      model, lambda p: optimizer.make_optimizer(config.training, p),
      parallel.make_mesh(jax.devices()[:1]))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  assert n_params > 0
  assert int(config.training.batch_size) > 0 and int(config.training.steps) > 0
