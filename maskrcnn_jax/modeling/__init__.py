"""Flax modules: ResNet-FPN backbone, RPN, RoI heads, the composed detector, and its builder."""
from maskrcnn_jax.modeling.builder import build_model, register_roi_head, torchvision_model_config
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN
from maskrcnn_jax.modeling.roi_heads import HeadContext, RoIHead

__all__ = ["HeadContext", "MaskRCNN", "RoIHead", "build_model", "register_roi_head",
           "torchvision_model_config"]
