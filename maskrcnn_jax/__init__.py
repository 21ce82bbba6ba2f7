"""maskrcnn_jax: Mask R-CNN in JAX/Flax."""
from maskrcnn_jax.evaluation.inference import predict

__version__ = "0.1.0"
