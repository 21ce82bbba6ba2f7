"""The TPU recipe of r50_fpn_coco.py with a ResNet-101 backbone
(--config.init.imagenet_resnet=/weights/resnet101.pth)."""
from configs import r50_fpn_coco


def get_config():
  c = r50_fpn_coco.get_config()
  c.model.backbone.depth = 101
  return c
