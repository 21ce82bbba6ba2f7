"""Base config: torchvision's `maskrcnn_resnet50_fpn` (v1) defaults. Variants override a few fields."""
import ml_collections

from maskrcnn_jax.modeling.builder import torchvision_input_config, torchvision_model_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = torchvision_model_config(depth=50)
  c.input = torchvision_input_config()
  return c
