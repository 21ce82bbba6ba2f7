"""Exactly torchvision's `maskrcnn_resnet50_fpn` (v1): the config `convert.from_torchvision` builds."""
from configs import base


def get_config():
  return base.get_config()
