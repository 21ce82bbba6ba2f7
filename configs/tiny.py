"""A tiny Mask R-CNN for tests: 1-block-per-stage 8-wide ResNet, 32-channel FPN, 96-128 px input."""
from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.num_classes = 4  # background + the synthetic shapes' circle, square, triangle
  m.backbone.update(dict(depth=50, width_per_group=8, stage_blocks=(1, 1, 1, 1)))
  m.fpn.channels = 32
  m.rpn.channels = 32
  m.rpn.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
  m.rpn.pre_nms_topk_test = 300
  m.rpn.post_nms_topk_test = 100
  m.box_head.fc_layers = (64, 64)
  m.mask_head.layers = (32, 32)
  m.postprocess.candidates_per_image = 1000
  c.input.min_size = 96
  c.input.max_size = 128

  # Training on a small synthetic shapes set, from scratch: `train.py --config configs/tiny.py`.
  t = c.training
  t.steps = 100
  t.batch_size = 2
  t.learning_rate = 0.02
  t.schedule = "cosine"
  t.warmup_steps = 10
  t.clip_grad_norm = 10.0
  t.frozen_stages = 0
  t.log_every = 10
  t.checkpoint_every = 50
  t.keep_checkpoints = 2
  d = c.data
  d.dataset = "shapes"
  d.shapes.update(dict(num_train=64, num_val=16, image_size=128))
  d.image_size = (128, 128)
  d.resize = "fit"
  d.max_instances = 8
  d.max_crowd_instances = 2
  d.mask_crop_size = 28
  d.shuffle_buffer = 64
  return c
