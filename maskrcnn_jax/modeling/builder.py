"""Builds `MaskRCNN` from the `config.model` tree; unknown keys are errors, never dropped."""
import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN
from maskrcnn_jax.modeling.resnet import ResNet
from maskrcnn_jax.modeling.roi_heads import BoxHead, MaskHead, Postprocess, RoIPooler
from maskrcnn_jax.modeling.rpn import RPN

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_SECTIONS = {"backbone": ResNet, "fpn": FPN, "rpn": RPN, "roi_align": RoIPooler,
             "box_head": BoxHead, "mask_head": MaskHead, "postprocess": Postprocess}
_TOP_KEYS = {"num_classes", "mask_on", "dtype"} | set(_SECTIONS)


def _frozen(v):
  """Lists (ConfigDict turns tuples into lists on override) become tuples: modules must hash."""
  if isinstance(v, (list, tuple)):
    return tuple(_frozen(x) for x in v)
  return v


def _kwargs(section: str, cls, cfg: Mapping[str, Any], extra: Mapping[str, Any]):
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = set(cfg) - fields
  if unknown:
    raise ValueError(f"config.model.{section} has unknown keys {sorted(unknown)}; "
                     f"{cls.__name__} takes {sorted(fields - set(extra))}")
  kw = {k: _frozen(v) for k, v in cfg.items()}
  kw.update(extra)
  return kw


def build_model(model_cfg: Mapping[str, Any]) -> MaskRCNN:
  """config.model -> MaskRCNN. Raises ValueError naming any unknown key or value."""
  cfg = dict(model_cfg)
  unknown = set(cfg) - _TOP_KEYS
  if unknown:
    raise ValueError(f"config.model has unknown keys {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
  dtype_name = cfg.get("dtype", "float32")
  if dtype_name not in _DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
  dtype = _DTYPES[dtype_name]
  k = int(cfg["num_classes"])
  sub = lambda name: dict(cfg.get(name, {}))
  with_dtype = {"dtype": dtype}
  return MaskRCNN(
      num_classes=k,
      backbone=ResNet(**_kwargs("backbone", ResNet, sub("backbone"), with_dtype)),
      fpn=FPN(**_kwargs("fpn", FPN, sub("fpn"), with_dtype)),
      rpn=RPN(**_kwargs("rpn", RPN, sub("rpn"), with_dtype)),
      roi_align=RoIPooler(**_kwargs("roi_align", RoIPooler, sub("roi_align"), {})),
      box_head=BoxHead(**_kwargs("box_head", BoxHead, sub("box_head"),
                                 {"num_classes": k, **with_dtype})),
      mask_head=(MaskHead(**_kwargs("mask_head", MaskHead, sub("mask_head"),
                                    {"num_classes": k, **with_dtype}))
                 if cfg.get("mask_on", True) else None),
      postprocess=Postprocess(**_kwargs("postprocess", Postprocess, sub("postprocess"), {})),
  )


def torchvision_model_config(depth: int = 50, num_classes: int = 91):
  """The `config.model` tree of torchvision's `maskrcnn_resnet50_fpn` (v1) defaults.

  `configs/base.py` starts from this; `convert.from_torchvision` builds its model from it.
  """
  import ml_collections
  m = ml_collections.ConfigDict()
  m.num_classes = num_classes
  m.mask_on = True
  m.dtype = "float32"
  m.backbone = dict(depth=depth, width_per_group=64, stage_blocks=())
  m.fpn = dict(channels=256)
  m.rpn = dict(
      anchor_sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=(0.5, 1.0, 2.0),
      pre_nms_topk_train=2000, pre_nms_topk_test=1000,
      post_nms_topk_train=2000, post_nms_topk_test=1000,
      nms_threshold=0.7, min_size=1e-3, score_threshold=0.0,
      fg_iou_threshold=0.7, bg_iou_threshold=0.3, batch_size_per_image=256,
      positive_fraction=0.5, crowd_ioa_threshold=0.5, channels=256)
  m.roi_align = dict(pooler_type="align", box_output_size=7, mask_output_size=14,
                     sampling_ratio=2, aligned=False, canonical_scale=224, canonical_level=4)
  m.box_head = dict(representation_size=1024, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
                    fg_iou_threshold=0.5, bg_iou_threshold=0.5, batch_size_per_image=512,
                    positive_fraction=0.25, crowd_ioa_threshold=0.5)
  m.mask_head = dict(layers=(256, 256, 256, 256), dilation=1, num_rois=128)
  m.postprocess = dict(score_threshold=0.05, nms_threshold=0.5, detections_per_image=100,
                       min_size=1e-2, candidates_per_image=4000)
  return m


def torchvision_input_config():
  """Inference input settings: torchvision's transform, and the bucketing of padded shapes."""
  import ml_collections
  return ml_collections.ConfigDict(dict(min_size=800, max_size=1333, size_divisibility=32,
                                        bucket=128, batch_size=1))
