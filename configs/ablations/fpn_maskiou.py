"""Mask Scoring R-CNN: the MaskIoU head on R50-FPN; segm scores = box score x predicted
MaskIoU (paper 34.2 -> 35.6)."""
from configs.ablations import common


def get_config():
  c = common.fpn(50)
  c.model.mask_iou_head.type = "standard"
  return c
