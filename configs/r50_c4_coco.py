"""The paper's ResNet-50-C4 Mask R-CNN on COCO 2017 (Detectron2's `mask_rcnn_R_50_C4` model) on the
TPU recipe of r50_fpn_coco.py.

No FPN: the RPN reads C4 (stride 16) with anchors 32..512 on its one level, every RoI is pooled
14 x 14 from C4 with adaptive sampling and the half-pixel offset (Detectron2's ROIAlignV2), and
ResNet's res5 stage runs on every RoI as the head shared by boxes (average-pooled, then the
predictor) and masks (one 2x2 deconvolution to 256 channels, 14 x 14 masks). Needs an ImageNet
backbone (its layer4 fills the res5 head):

    python train.py --config configs/r50_c4_coco.py --workdir gs://.../r50c4 \\
      --config.data.root=/data/coco --config.init.imagenet_resnet=/weights/resnet50.pth
"""
from configs import r50_fpn_coco


def get_config():
  c = r50_fpn_coco.get_config()
  m = c.model
  m.backbone.type = "resnet_c4"
  m.rpn.channels = 1024                          # the head's convs as wide as C4
  m.rpn.anchor_sizes = ((32, 64, 128, 256, 512),)
  m.rpn.pre_nms_topk_train = 12_000
  m.rpn.post_nms_topk_train = 2000
  m.rpn.pre_nms_topk_test = 6000
  m.rpn.post_nms_topk_test = 1000
  for pooler in (m.box_pooler, m.mask_pooler):
    pooler.update(dict(output_size=14, sampling_ratio=0, aligned=True))
  m.box_head.fc_layers = ()                      # the predictor reads the averaged res5 features
  m.mask_head.update(dict(layers=(), deconv_channels=256))
  return c
