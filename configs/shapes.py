"""The CPU demo: a small Mask R-CNN trained from scratch on 128 px synthetic shapes.

    python train.py --config configs/shapes.py --workdir /tmp/shapes

generates the shapes data on first use (~/.cache/maskrcnn_jax/shapes-<hash>). The knobs to tune
(steps, learning rate, batch, model width) are plain fields below; override them from the command
line, e.g. --config.training.steps=3000 --config.model.backbone.width_per_group=32.
"""
from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.num_classes = 4  # background + circle, square, triangle
  m.backbone.update(dict(depth=50, width_per_group=16, stage_blocks=(1, 1, 1, 1)))
  m.fpn.channels = 64
  m.rpn.channels = 64
  m.rpn.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
  # Proposal and RoI counts drive the step time on a CPU: a few objects per image need few.
  m.rpn.pre_nms_topk_train = 600
  m.rpn.post_nms_topk_train = 150
  m.rpn.pre_nms_topk_test = 300
  m.rpn.post_nms_topk_test = 100
  m.rpn_sampler.batch_size_per_image = 128
  m.box_head.fc_layers = (256, 256)
  m.roi_sampler.batch_size_per_image = 64
  # The mask head trains on 8 of the (up to 16) positive RoIs per image: it is the costliest part
  # of a step here (16 -> 8 measured 2.5 -> 3.6 steps/s), and ~3 objects per image still get
  # 2-3 RoIs each.
  m.mask_head.layers = (64, 64)
  m.mask_sampler.num_rois = 8
  m.postprocess.candidates_per_image = 1000
  c.input.min_size = 128
  c.input.max_size = 128

  t = c.training
  t.steps = 3000                 # ~14 minutes on 2 CPU cores
  t.batch_size = 8
  t.learning_rate = 0.04
  t.schedule = "cosine"
  t.warmup_steps = 100
  t.weight_decay = 1e-4
  t.clip_grad_norm = 10.0
  t.frozen_stages = 0            # from scratch: nothing is pretrained, so nothing is frozen
  t.log_every = 20
  t.checkpoint_every = 250
  t.keep_checkpoints = 2
  t.eval_every = 1000
  t.compilation_cache_dir = "~/.cache/maskrcnn_jax/jax_cache"  # reruns skip the ~20 s compile

  d = c.data
  d.dataset = "shapes"
  d.shapes.update(dict(num_train=1000, num_val=100, seed=0, image_size=128))
  d.image_size = (128, 128)
  d.resize = "fit"
  d.scale_range = (1.0, 1.0)
  d.max_instances = 8
  d.max_crowd_instances = 2
  d.mask_crop_size = 56           # stored mask targets (objects are up to ~70 px)
  d.shuffle_buffer = 1000
  return c
