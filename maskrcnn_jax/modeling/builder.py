"""`config.model` -> `MaskRCNN`: every section resolved and validated here, when the model is built.

Sections and their types (a section with variants has a `type` key; it holds the union of its
types' fields, and a field the chosen type does not use is ignored; any other key is an error):

  backbone      type 'resnet_fpn': `ResNet` (C2..C5) under an `FPN` (the `fpn` section);
                type 'resnet_c4': `ResNet` C2..C4 (the paper's ResNet-C4): the RPN and every
                pooler read C4 (stride 16; the poolers' `levels` and level-mapping keys are
                unused, the `fpn` section too), the per-level `rpn.anchor_sizes` become the sizes
                of C4's one level, and ResNet's last stage (`ResNetStage`, Detectron2's
                `Res5ROIHeads`) runs on every pooled RoI, shared by the RoI heads (the box head
                reads it average-pooled)
  fpn           `FPN`
  rpn           `RPN` (inference settings)
  rpn_sampler   `samplers.AnchorSampler`
  roi_sampler   `samplers.RoISampler`
  box_pooler    `poolers.RoIPooler` (type 'align' RoIAlign, 'pool' RoIPool, 'warp' RoIWarp;
                `reduce` 'ave' / 'max'; `sampling_ratio` 0 = adaptive)
  box_head      `roi_heads.BoxHead` (type 'conv_fc')
  postprocess   `roi_heads.Postprocess`
  mask_pooler   `poolers.RoIPooler` of the mask head (types as box_pooler)
  mask_head     type 'fcn': `mask_head.MaskHead`; 'mlp': `mask_head.MLPMaskHead` (the paper's fc
                heads); 'none': off (Faster R-CNN); either type with `class_agnostic` and `loss`
                'sigmoid' (per class) or 'softmax' (per pixel over the classes)
  mask_sampler  `samplers.ForegroundSampler` (`num_rois`; `mask_head.num_rois` is its alias)
  mask_iou_head type 'standard': `mask_iou_head.MaskIoUHead` (Mask Scoring R-CNN, on the mask
                head's outputs and `mask_sampler`'s RoIs); 'none': off (the default)
  keypoint_pooler `poolers.RoIPooler` of the keypoint head (14 x 14 in torchvision)
  keypoint_head type 'rcnn': `keypoint_head.KeypointHead` (Keypoint R-CNN); 'none': off (the
                default)
  keypoint_sampler `samplers.ForegroundSampler`: the keypoint head's foreground RoIs

plus `num_classes`, `dtype` ('float32' or 'bfloat16' compute; parameters, box math and losses stay
float32), `mask_on` (False turns the mask head off, as `mask_head.type='none'` does) and
`loss_weights` ({loss name: weight}, 1 where absent).

RoI heads after the box head come from `ROI_HEADS`; `register_roi_head` adds one (a new section, or
a new type of an existing one) without editing the package.
"""
import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp

from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.keypoint_head import KeypointHead
from maskrcnn_jax.modeling.mask_head import MaskHead, MLPMaskHead
from maskrcnn_jax.modeling.mask_iou_head import MaskIoUHead
from maskrcnn_jax.modeling.mask_rcnn import BOX_LOSSES, MaskRCNN
from maskrcnn_jax.modeling.poolers import RoIPooler
from maskrcnn_jax.modeling.resnet import ResNet, ResNetStage
from maskrcnn_jax.modeling.roi_heads import BoxHead, Postprocess
from maskrcnn_jax.modeling.rpn import C4_LEVELS, PYRAMID_LEVELS, RPN
from maskrcnn_jax.modeling.samplers import AnchorSampler, ForegroundSampler, RoISampler

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BACKBONE_TYPES = {"resnet_fpn": ResNet, "resnet_c4": ResNet}
OFF = "none"


@dataclasses.dataclass
class HeadEntry:
  """A RoI head section: its types, and the pooler and sampler sections it uses."""
  types: Dict[str, type]
  pooler: Optional[str] = None
  sampler: Optional[str] = None


# Run order is insertion order: a head that reads another comes after it.
ROI_HEADS: Dict[str, HeadEntry] = {
    "mask_head": HeadEntry({"fcn": MaskHead, "mlp": MLPMaskHead}, pooler="mask_pooler",
                           sampler="mask_sampler"),
    # Mask Scoring R-CNN: reads the mask head's features and masks (no pooler of its own).
    "mask_iou_head": HeadEntry({"standard": MaskIoUHead}, sampler="mask_sampler"),
    "keypoint_head": HeadEntry({"rcnn": KeypointHead}, pooler="keypoint_pooler",
                               sampler="keypoint_sampler"),
}
SAMPLERS: Dict[str, type] = {"rpn_sampler": AnchorSampler, "roi_sampler": RoISampler,
                             "mask_sampler": ForegroundSampler,
                             "keypoint_sampler": ForegroundSampler}
POOLERS = ("box_pooler", "mask_pooler")
# Keys kept for compatibility: section -> {alias: (section, key) it stands for}.
# `mask_head.loss` names the mask heads' `loss_type` field (their `loss` is the RoI-head method).
ALIASES = {"mask_head": {"num_rois": ("mask_sampler", "num_rois"),
                         "loss": ("mask_head", "loss_type")}}


def register_roi_head(section: str, type_name: str, cls: type, *, pooler: Optional[str] = None,
                      sampler: Optional[str] = None, sampler_cls: Optional[type] = None) -> None:
  """Makes `config.model.<section>.type = type_name` build `cls` (a `roi_heads.RoIHead`).

  Args:
    section: the config section (a new one, or an existing head's to add a variant).
    type_name: the `type` value selecting `cls`.
    cls: the head module; its fields other than num_classes, dtype and pooler are the section's
      keys.
    pooler: the config section of its `RoIPooler` (passed as the `pooler` field), or None.
    sampler: the config section of its sampler (an existing one, e.g. 'mask_sampler', or a new one
      given with `sampler_cls`), or None to train on the box head's RoI samples.
    sampler_cls: the dataclass of a new sampler section.
  """
  for method in ("predict", "loss"):
    if not callable(getattr(cls, method, None)):
      raise TypeError(f"{cls.__name__} needs a {method}(...) method to be a RoI head")
  if type_name == OFF:
    raise ValueError(f"'{OFF}' is reserved for turning a head off")
  if pooler is not None and not pooler.endswith("_pooler"):
    raise ValueError(f"pooler sections are named '<name>_pooler', got {pooler!r}")
  if sampler is not None:
    if sampler not in SAMPLERS and sampler_cls is None:
      raise ValueError(f"unknown sampler section {sampler!r}: pass sampler_cls")
    if sampler in SAMPLERS and sampler_cls not in (None, SAMPLERS[sampler]):
      raise ValueError(f"sampler section {sampler!r} already holds {SAMPLERS[sampler].__name__}")
  entry = ROI_HEADS.get(section)
  if entry is not None and (pooler, sampler) != (entry.pooler, entry.sampler):
    raise ValueError(f"{section} uses pooler {entry.pooler!r} and sampler {entry.sampler!r}")
  if sampler is not None:
    SAMPLERS.setdefault(sampler, sampler_cls)
  if entry is None:
    ROI_HEADS[section] = HeadEntry({type_name: cls}, pooler=pooler, sampler=sampler)
  else:
    entry.types[type_name] = cls


def _frozen(v):
  """Lists (ConfigDict turns tuples into lists on override) become tuples: modules must hash."""
  if isinstance(v, (list, tuple)):
    return tuple(_frozen(x) for x in v)
  return v


def _fields(cls) -> set:
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _section(cfg: Mapping[str, Any], section: str, classes, fixed: Mapping[str, Any] = ()):
  """The kwargs of `classes` (one class, or {type: class} of a section with variants) from the
  section's config; fixed kwargs (num_classes, dtype, ...) are not config keys. Returns
  (type or None, class or None, kwargs)."""
  fixed = dict(fixed)
  values = dict(cfg.get(section) or {})
  aliases = set(ALIASES.get(section, {}))
  for alias in aliases:
    values.pop(alias, None)  # `_resolve_aliases` moved it to its target
  if isinstance(classes, Mapping):
    # A RoI head whose section is absent is off; another section defaults to its first type.
    default = OFF if section in ROI_HEADS else next(iter(classes))
    type_name = values.pop("type", default)
    known = sorted(list(classes) + ([OFF] if section in ROI_HEADS else []))
    union = set().union(*(_fields(c) for c in classes.values())) - set(fixed) - {"type"}
    unknown = set(values) - union
    if unknown:
      raise ValueError(f"config.model.{section} has unknown keys {sorted(unknown)}; its types "
                       f"{known} take {sorted(union | {'type'} | aliases)}")
    if type_name == OFF and section in ROI_HEADS:
      return OFF, None, {}
    if type_name not in classes:
      raise ValueError(f"config.model.{section}.type must be one of {known}, got {type_name!r}")
    cls = classes[type_name]
    kwargs = {k: _frozen(v) for k, v in values.items() if k in _fields(cls)}
  else:
    cls, type_name = classes, values.get("type")
    allowed = _fields(cls) - set(fixed)
    unknown = set(values) - allowed
    if unknown:
      raise ValueError(f"config.model.{section} has unknown keys {sorted(unknown)}; "
                       f"{cls.__name__} takes {sorted(allowed | aliases)}")
    kwargs = {k: _frozen(v) for k, v in values.items()}
  kwargs.update({k: v for k, v in fixed.items() if k in _fields(cls)})
  return type_name, cls, kwargs


def _resolve_aliases(cfg: Dict[str, Any]) -> Dict[str, Any]:
  """Moves each alias key's value to the key it stands for (`ALIASES`); the two set to different
  values is an error (a ConfigDict keeps them in step, a plain dict may not)."""
  cfg = dict(cfg)
  for section, aliases in ALIASES.items():
    values = dict(cfg.get(section) or {})
    for alias, (target, key) in aliases.items():
      if alias not in values:
        continue
      target_values = dict(cfg.get(target) or {})
      if key in target_values and _frozen(target_values[key]) != _frozen(values[alias]):
        raise ValueError(f"config.model.{section}.{alias}={values[alias]!r} is an alias of "
                         f"{target}.{key}={target_values[key]!r}: set one of them")
      target_values[key] = values[alias]
      cfg[target] = target_values
  return cfg


def _make(section: str, cls, kwargs):
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model.{section}: {e}") from None


def known_sections() -> Tuple[str, ...]:
  return (("backbone", "fpn", "rpn", "box_head", "postprocess") + tuple(SAMPLERS) + POOLERS
          + tuple(ROI_HEADS) + tuple(e.pooler for e in ROI_HEADS.values()
                                     if e.pooler and e.pooler not in POOLERS))


def build_model(model_cfg: Mapping[str, Any], *, frozen_stages: int = 0) -> MaskRCNN:
  """config.model -> MaskRCNN, validated whole (unknown keys, types, values, head dependencies).

  Args:
    model_cfg: the `config.model` tree (see the module docstring).
    frozen_stages: training.frozen_stages: the backbone stages whose batch-norm statistics stay
      at their running values in training (no effect on parameters or inference).

  Raises:
    ValueError naming the section and key of anything that cannot be built.
  """
  cfg = _resolve_aliases(dict(model_cfg))
  top = {"num_classes", "mask_on", "dtype", "loss_weights"}
  unknown = set(cfg) - top - set(known_sections())
  if unknown:
    raise ValueError(f"config.model has unknown keys {sorted(unknown)}; known: "
                     f"{sorted(top | set(known_sections()))}")
  dtype_name = cfg.get("dtype", "float32")
  if dtype_name not in _DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
  dtype = _DTYPES[dtype_name]
  k = int(cfg["num_classes"])
  if k < 2:
    raise ValueError(f"config.model.num_classes counts background too: >= 2, got {k}")
  common = {"dtype": dtype, "num_classes": k}

  def single(section, cls, extra=()):
    _, c, kwargs = _section(cfg, section, cls, {**common, **dict(extra)})
    return _make(section, c, kwargs)

  backbone_type = dict(cfg.get("backbone") or {}).get("type", next(iter(BACKBONE_TYPES)))
  c4 = backbone_type == "resnet_c4"
  _, backbone_cls, kwargs = _section(cfg, "backbone", BACKBONE_TYPES, {
      **common, "frozen_stages": int(frozen_stages), "num_stages": 3 if c4 else 4})
  backbone = _make("backbone", backbone_cls, kwargs)
  trunk = None
  if c4:
    trunk = _make("backbone", ResNetStage, dict(
        {k: kwargs[k] for k in ("depth", "width_per_group", "stage_blocks", "norm", "norm_eps")
         if k in kwargs}, dtype=dtype))
  levels = C4_LEVELS if c4 else PYRAMID_LEVELS
  samplers = {name: single(name, cls) for name, cls in SAMPLERS.items()}
  poolers = {name: single(name, RoIPooler) for name in known_sections() if name.endswith("_pooler")}
  for name, pooler in poolers.items():
    if c4:  # every pooler reads C4
      poolers[name] = dataclasses.replace(pooler, levels=C4_LEVELS)
    elif not set(pooler.levels) <= set(levels):
      raise ValueError(f"config.model.{name}.levels={pooler.levels}: the backbone gives levels "
                       f"{levels}")
  rpn = single("rpn", RPN, {"levels": levels})
  if c4 and len(rpn.anchor_sizes) > 1:  # the FPN's per-level sizes, all on C4's one level
    rpn = rpn.clone(anchor_sizes=(tuple(s for sizes in rpn.anchor_sizes for s in sizes),))
  if len(rpn.anchor_sizes) != len(levels):
    strides = ", ".join(f"stride {2 ** level}" for level in levels)
    raise ValueError(f"config.model.rpn.anchor_sizes has {len(rpn.anchor_sizes)} levels; the "
                     f"backbone gives {len(levels)} ({strides})")
  if len({len(s) for s in rpn.anchor_sizes}) != 1:
    raise ValueError("config.model.rpn.anchor_sizes: every level needs the same number of sizes "
                     f"(anchors per location), got {rpn.anchor_sizes}")

  heads, enabled = [], {}
  for section, entry in ROI_HEADS.items():
    fixed = dict(common, **({"pooler": poolers[entry.pooler]} if entry.pooler else {}))
    type_name, cls, kwargs = _section(cfg, section, entry.types, fixed)
    if section == "mask_head" and not cfg.get("mask_on", True):
      type_name = OFF
    if type_name == OFF:
      continue
    enabled[section] = type_name
    heads.append((section, _make(section, cls, kwargs),
                  samplers[entry.sampler] if entry.sampler else None))
  order = [section for section, _, _ in heads]
  losses = {name: "the box head" for name in BOX_LOSSES}
  for section, head, _ in heads:
    for need in getattr(head, "requires", ()):
      if need not in enabled:
        raise ValueError(f"config.model.{section}.type={enabled[section]!r} needs {need}, "
                         f"which is off ({need}.type='{OFF}'" +
                         (" or mask_on=False)" if need == "mask_head" else ")"))
      if order.index(need) > order.index(section):
        raise ValueError(f"{section} reads {need}, which runs after it: register {need} first")
    for name in getattr(head, "loss_names", ()):
      if not name.startswith("loss_"):
        raise ValueError(f"{type(head).__name__}.loss_names: {name!r} must start with 'loss_' "
                         "(the objective sums the loss_* entries)")
      if name in losses:
        raise ValueError(f"{section} and {losses[name]} both return {name!r}")
      losses[name] = section

  roi = samplers["roi_sampler"]
  for section, _, sampler in heads:
    if isinstance(sampler, ForegroundSampler) and sampler.num_rois > roi.max_positives:
      raise ValueError(f"{ROI_HEADS[section].sampler}.num_rois={sampler.num_rois} exceeds the "
                       f"{roi.max_positives} foreground RoIs roi_sampler samples at most "
                       "(batch_size_per_image * positive_fraction): slots beyond are never used")

  known_losses = set(BOX_LOSSES) | {n for e in ROI_HEADS.values() for c in e.types.values()
                                    for n in getattr(c, "loss_names", ())}
  weights = dict(cfg.get("loss_weights") or {})
  bad = sorted(set(weights) - known_losses)
  if bad:
    raise ValueError(f"config.model.loss_weights has unknown losses {bad}; known: "
                     f"{sorted(known_losses)}")
  for name, w in weights.items():
    if not float(w) >= 0:
      raise ValueError(f"config.model.loss_weights.{name} must be >= 0, got {w}")

  fpn = single("fpn", FPN)  # validated either way
  box_head = single("box_head", BoxHead)
  if c4 and box_head.conv_layers:
    raise ValueError("config.model.box_head.conv_layers: a C4 model's box head reads the averaged "
                     "res5 features (1 x 1): use fc_layers (or none)")
  return MaskRCNN(
      num_classes=k, backbone=backbone, fpn=None if c4 else fpn, rpn=rpn, roi_trunk=trunk,
      box_pooler=poolers["box_pooler"], box_head=box_head,
      postprocess=single("postprocess", Postprocess),
      rpn_sampler=samplers["rpn_sampler"], roi_sampler=roi, roi_heads=tuple(heads),
      loss_weights=tuple(sorted((n, float(w)) for n, w in weights.items())))


def torchvision_model_config(depth: int = 50, num_classes: int = 91, version: int = 1,
                             mask: bool = True, keypoints: int = 0):
  """The `config.model` tree of torchvision's `{mask,faster}rcnn_resnet50_fpn[_v2]` defaults.

  Args:
    depth: ResNet depth (50, or 101 for the same model on resnet_fpn_backbone('resnet101')).
    num_classes: including background (91 for COCO's category ids).
    version: 1 (`maskrcnn_resnet50_fpn`: frozen BN, TwoMLPHead) or 2 (`*_v2`: BatchNorm in the
      backbone, FPN and heads, a two-conv RPN head, the 4conv1fc box head).
    mask: Mask R-CNN (True) or Faster R-CNN (False: mask_head.type='none').
    keypoints: K > 0 adds torchvision's Keypoint R-CNN head for K keypoints
      (`keypointrcnn_resnet50_fpn`: num_classes=2, mask=False, keypoints=17); 0: none.

  `configs/base.py` starts from this; `convert.from_torchvision` builds its model from it.
  """
  import ml_collections
  if version not in (1, 2):
    raise ValueError(f"version must be 1 or 2, got {version}")
  v2 = version == 2
  m = ml_collections.ConfigDict()
  m.num_classes = num_classes
  m.mask_on = True
  m.dtype = "float32"
  m.loss_weights = ml_collections.ConfigDict(
      {name: 1.0 for name in BOX_LOSSES + ("loss_mask", "loss_maskiou", "loss_keypoint")})
  m.backbone = dict(type="resnet_fpn", depth=depth, width_per_group=64, stage_blocks=(),
                    norm="bn" if v2 else "frozen_bn", norm_eps=1e-5, remat=False)
  m.fpn = dict(channels=256, norm="bn" if v2 else "none")
  m.rpn = dict(
      anchor_sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=(0.5, 1.0, 2.0),
      pre_nms_topk_train=2000, pre_nms_topk_test=1000,
      post_nms_topk_train=2000, post_nms_topk_test=1000,
      nms_threshold=0.7, min_size=1e-3, score_threshold=0.0, channels=256,
      conv_depth=2 if v2 else 1)
  m.rpn_sampler = dict(fg_iou_threshold=0.7, bg_iou_threshold=0.3, batch_size_per_image=256,
                       positive_fraction=0.5, crowd_ioa_threshold=0.5)
  m.roi_sampler = dict(fg_iou_threshold=0.5, bg_iou_threshold=0.5, batch_size_per_image=512,
                       positive_fraction=0.25, crowd_ioa_threshold=0.5, add_gt_as_proposals=True)
  pooler = dict(type="align", sampling_ratio=2, aligned=False, canonical_scale=224,
                canonical_level=4, levels=(2, 3, 4, 5), reduce=RoIPooler.reduce,
                max_samples=RoIPooler.max_samples, max_bin_size=RoIPooler.max_bin_size)
  m.box_pooler = dict(pooler, output_size=7)
  m.box_head = dict(type="conv_fc", conv_layers=(256,) * 4 if v2 else (),
                    fc_layers=(1024,) if v2 else (1024, 1024), norm="bn" if v2 else "none",
                    bbox_reg_weights=(10.0, 10.0, 5.0, 5.0))
  m.postprocess = dict(score_threshold=0.05, nms_threshold=0.5, detections_per_image=100,
                       min_size=1e-2, candidates_per_image=4000)
  m.mask_pooler = dict(pooler, output_size=14)
  m.mask_head = dict(type="fcn" if mask else OFF, layers=(256, 256, 256, 256), dilation=1,
                     norm="bn" if v2 else "none", deconv_channels=0, class_agnostic=False,
                     loss="sigmoid", mlp_layers=(1024, 1024), train_buckets=(32, 64))
  m.mask_sampler = dict(num_rois=128)
  m.mask_head.num_rois = m.mask_sampler.get_ref("num_rois")  # the alias, kept in step
  m.mask_iou_head = dict(type=OFF, conv_layers=(256, 256, 256, 256), fc_layers=(1024, 1024))
  m.keypoint_pooler = dict(pooler, output_size=14)
  m.keypoint_head = dict(type="rcnn" if keypoints else OFF, num_keypoints=int(keypoints) or 17,
                         conv_layers=(512,) * 8, train_buckets=(32, 64))
  m.keypoint_sampler = dict(num_rois=128)
  return m


def torchvision_input_config():
  """Inference input settings: torchvision's transform, and the bucketing of padded shapes."""
  import ml_collections
  return ml_collections.ConfigDict(dict(min_size=800, max_size=1333, size_divisibility=32,
                                        bucket=128, batch_size=1))
