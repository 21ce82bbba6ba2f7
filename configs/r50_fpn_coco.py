"""The TPU recipe for R50-FPN Mask R-CNN on COCO 2017 (TensorFlow TPU Mask R-CNN / MLPerf style).

Fixed 1024x1024 padded input (resize='fit' with 0.8-1.25 scale jitter), global batch 64 at lr 0.08
with a linear warm-up, 22.5k steps (~12 epochs) decayed 10x at 15k and 20k, bfloat16 compute. Needs
an ImageNet backbone and the COCO folder:

    python train.py --config configs/r50_fpn_coco.py --workdir gs://.../r50 \\
      --config.data.root=/data/coco --config.init.imagenet_resnet=/weights/resnet50.pth
"""
from configs import base


def get_config():
  c = base.get_config()
  c.model.dtype = "bfloat16"

  t = c.training
  t.steps = 22_500
  t.batch_size = 64
  t.learning_rate = 0.08
  t.schedule = "step"
  t.decay_steps = (15_000, 20_000)
  t.decay_factor = 0.1
  t.warmup_steps = 500
  t.warmup_factor = 0.0067 / 0.08  # the TPU recipe's warm-up starts at lr 0.0067
  t.weight_decay = 4e-5
  t.frozen_stages = 1
  t.log_every = 50
  t.checkpoint_every = 1000
  t.eval_every = 5000

  d = c.data
  d.dataset = "coco_format"
  d.root = ""                    # --config.data.root=/data/coco
  d.image_size = (1024, 1024)
  d.resize = "fit"
  d.scale_range = (0.8, 1.25)
  d.max_instances = 100
  d.mask_crop_size = 112
  d.image_dtype = "uint8"        # normalized on the device: a quarter of the host-to-TPU bytes
  d.shuffle_buffer = 4096
  return c
