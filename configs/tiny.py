"""A tiny Mask R-CNN for tests: a 1-block-per-stage, 8-wide ResNet, 32-channel FPN, 96-128 px input."""
from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.num_classes = 4  # background + the synthetic shapes' circle, square, triangle
  m.backbone = dict(depth=50, width_per_group=8, stage_blocks=(1, 1, 1, 1))
  m.fpn = dict(channels=32)
  m.rpn.channels = 32
  m.rpn.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
  m.rpn.pre_nms_topk_test = 300
  m.rpn.post_nms_topk_test = 100
  m.box_head.representation_size = 64
  m.mask_head = dict(layers=(32, 32), dilation=1, num_rois=128)
  m.postprocess.candidates_per_image = 1000
  c.input.min_size = 96
  c.input.max_size = 128
  return c
