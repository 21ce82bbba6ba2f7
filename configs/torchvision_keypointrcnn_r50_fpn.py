"""Exactly torchvision's `keypointrcnn_resnet50_fpn` (2 classes: background, person; 17 COCO
keypoints), as `convert.from_torchvision` builds it from that model's state_dict, evaluated on COCO
person keypoints:

    python eval.py --config configs/torchvision_keypointrcnn_r50_fpn.py \\
      --torchvision_weights keypointrcnn_resnet50_fpn_coco-fc266e95.pth \\
      --config.data.root=/data/coco
"""
from configs import base
from maskrcnn_jax.modeling.builder import torchvision_model_config


def get_config():
  c = base.get_config()
  c.model = torchvision_model_config(depth=50, num_classes=2, mask=False, keypoints=17)
  c.data.annotations = "person_keypoints"  # annotations/person_keypoints_{train,val}2017.json
  return c
