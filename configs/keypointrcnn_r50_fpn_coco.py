"""Keypoint R-CNN R50-FPN on COCO 2017 person keypoints, torchvision's recipe
(references/detection, `keypointrcnn_resnet50_fpn`): global batch 16 (8 x 2 images), SGD at lr
0.02 with momentum 0.9 and weight decay 1e-4, 46 epochs decayed 10x after epochs 36 and 43,
multi-scale training (short side 640-800, long side <= 1333), images with fewer than 10 labelled
keypoints dropped from training; padded to a fixed 1344 x 1344 canvas so that one compiled step
serves every batch (TPU). Needs an ImageNet backbone and the COCO folder:

    python train.py --config configs/keypointrcnn_r50_fpn_coco.py --workdir gs://.../kp_r50 \\
      --config.data.root=/data/coco --config.init.imagenet_resnet=/weights/resnet50.pth
"""
from configs import base
from maskrcnn_jax.modeling.builder import torchvision_model_config

# torchvision's reference logs 3538 iterations of 16 images per epoch on train2017's person
# keypoints after dropping images with < 10 labelled keypoints (~56.6k images; the prepared
# dataset's skip report and the pipeline count them).
STEPS_PER_EPOCH = 3538


def get_config():
  c = base.get_config()
  c.model = torchvision_model_config(depth=50, num_classes=2, mask=False, keypoints=17)
  c.model.dtype = "bfloat16"

  t = c.training
  t.batch_size = 16
  t.learning_rate = 0.02
  t.steps = 46 * STEPS_PER_EPOCH
  t.schedule = "step"
  t.decay_steps = (36 * STEPS_PER_EPOCH, 43 * STEPS_PER_EPOCH)
  t.decay_factor = 0.1
  t.warmup_steps = 1000
  t.warmup_factor = 0.001
  t.frozen_stages = 1            # torchvision's trainable_backbone_layers=3
  t.checkpoint_every = 2000
  t.eval_every = 10 * STEPS_PER_EPOCH

  d = c.data
  d.dataset = "coco_format"
  d.root = ""                    # --config.data.root=/data/coco
  d.annotations = "person_keypoints"
  d.min_keypoints_per_image = 10
  d.resize = "short_side"
  with d.ignore_type():  # an int in base.py; a tuple draws one per example
    d.min_size = (640, 672, 704, 736, 768, 800)
  d.max_size = 1333
  d.image_size = (1344, 1344)
  d.shuffle_buffer = 4096
  return c
