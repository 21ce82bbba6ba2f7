"""torchvision-style Mask R-CNN with a ResNet-101-FPN backbone
(`resnet_fpn_backbone('resnet101')`)."""
from configs import base


def get_config():
  c = base.get_config()
  c.model.backbone.depth = 101
  return c
