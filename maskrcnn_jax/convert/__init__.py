"""Weight import: torchvision detection state_dicts (Faster / Mask R-CNN, v1 / v2) into maskrcnn_jax
models and variables."""
from maskrcnn_jax.convert.torchvision import (
    describe_state_dict,
    from_torchvision,
    variables_from_state_dict,
)

__all__ = ["describe_state_dict", "from_torchvision", "variables_from_state_dict"]
