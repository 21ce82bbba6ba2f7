"""Exactly torchvision's `maskrcnn_resnet50_fpn` (v1), as `convert.from_torchvision` builds it."""
from configs import base


def get_config():
  return base.get_config()
