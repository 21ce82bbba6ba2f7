"""maskrcnn_jax: Mask R-CNN in JAX/Flax.

`maskrcnn_jax.predict` is imported lazily, so that the numpy/tf-only `maskrcnn_jax.data` (and its
command lines, e.g. `python -m maskrcnn_jax.data.shapes`) never load jax.
"""
__version__ = "0.1.0"


def __getattr__(name):
  if name == "predict":
    from maskrcnn_jax.evaluation.inference import predict
    return predict
  raise AttributeError(f"module 'maskrcnn_jax' has no attribute {name!r}")
