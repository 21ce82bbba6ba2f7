"""Flax modules: ResNet-FPN backbone, RPN, RoI heads, the composed MaskRCNN."""
from maskrcnn_jax.modeling.builder import build_model, torchvision_model_config
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN
