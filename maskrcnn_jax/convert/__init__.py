"""Weight import: torchvision Mask R-CNN state_dicts into maskrcnn_jax variables."""
from maskrcnn_jax.convert.torchvision import from_torchvision, variables_from_state_dict
