"""Exactly torchvision's `fasterrcnn_resnet50_fpn` (v1): Faster R-CNN, frozen BN, TwoMLPHead.

The config `convert.from_torchvision` builds for such a state_dict; with
`--config.model.backbone.depth=101` the same model on a ResNet-101.
"""
from configs import base
from maskrcnn_jax.modeling.builder import torchvision_model_config


def get_config():
  c = base.get_config()
  c.model = torchvision_model_config(depth=50, num_classes=91, version=1, mask=False)
  return c
