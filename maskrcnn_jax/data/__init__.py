"""Input side: a tfds builder for COCO-format folders, transforms, the tf.data pipeline, synthetic
shapes and keypoint figures.

This package imports numpy, tensorflow, tensorflow_datasets, pycocotools and PIL only, never jax
or other maskrcnn_jax subpackages. TensorFlow is imported lazily: `maskrcnn_jax.data.preprocess`
(numpy only) can be used by the model side without paying for TF.
"""
import importlib

_LAZY = {
    "prepare_coco_format": "maskrcnn_jax.data.builder",
    "CocoFormat": "maskrcnn_jax.data.builder",
    "make_dataset": "maskrcnn_jax.data.pipeline",
    "make_eval_dataset": "maskrcnn_jax.data.pipeline",
    "make_train_dataset": "maskrcnn_jax.data.pipeline",
    "read_examples": "maskrcnn_jax.data.pipeline",
    "generate_shapes": "maskrcnn_jax.data.shapes",
    "generate_keypoint_shapes": "maskrcnn_jax.data.keypoint_shapes",
    "load_keypoint_info": "maskrcnn_jax.data.builder",
}

__all__ = sorted(_LAZY) + ["preprocess"]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return __all__
