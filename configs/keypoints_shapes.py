"""The keypoint CPU demo: a small Keypoint R-CNN trained from scratch on 128 px synthetic stick
figures (`maskrcnn_jax.data.keypoint_shapes`: 11 named joints with left/right pairs, OKS sigmas
0.1), boxes and keypoints, no masks (the paper's keypoint-only model).

    python train.py --config configs/keypoints_shapes.py --workdir /tmp/keypoints

generates the data on first use (~/.cache/maskrcnn_jax/keypoint_shapes-<hash>) and evaluates COCO
box AP and OKS keypoint AP on the held-out split (`make demo-keypoints` runs both). The model is
configs/shapes.py's with a slimmer keypoint head (two 3x3 convs of 64 instead of torchvision's
eight of 512: `keypoint_head.conv_layers`; on 14 x 14 RoIs the convs are most of the head's time)
and a third of the steps (1000 of 8 images, ~10 minutes on 2 CPU cores).
"""
from configs import shapes


def get_config():
  c = shapes.get_config()
  m = c.model
  m.num_classes = 2  # background + figure
  m.mask_on = False
  m.keypoint_head.update(dict(type="rcnn", num_keypoints=11, conv_layers=(64, 64)))
  # The keypoint head trains on up to 8 foreground RoIs per image (figures: 1-4 per image).
  m.keypoint_sampler.num_rois = 8

  t = c.training
  t.steps = 1000
  t.eval_every = 500

  d = c.data
  d.dataset = "keypoint_shapes"
  d.keypoint_shapes.update(dict(num_train=1000, num_val=100, seed=0, image_size=128))
  d.max_instances = 4
  return c
