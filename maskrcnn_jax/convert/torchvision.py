"""torchvision detection `state_dict`s -> maskrcnn_jax models and variables (numpy only; torch only
for `.pth`): Faster and Mask R-CNN, v1 and v2, and Keypoint R-CNN, on ResNet-50 and -101 FPN
backbones.

Every one of our variables has exactly one torchvision name (`torch_names` lists the spellings that
torchvision releases used), so a state_dict converts one to one and any missing, unexpected or
mis-shaped key is reported by name.
"""
import pickle
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from maskrcnn_jax.modeling.builder import build_model, torchvision_model_config
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, init_variables
from maskrcnn_jax.modeling.resnet import _STAGES

_BACKBONES = {"resnet50": 50, "resnet101": 101}
_IGNORED = re.compile(r".*num_batches_tracked$")


_NORM_LEAVES = {"scale": "weight", "bias": "bias", "weight": "weight",
                "running_mean": "running_mean", "running_var": "running_var"}


def _backbone_parts(mid, norm_index: str):
  parts = []
  for p in mid:
    m = re.fullmatch(r"layer(\d)_(\d+)", p)
    if m:
      parts += [f"layer{m[1]}", m[2]]
    elif p in ("downsample_conv", "downsample_bn"):
      parts += ["downsample", "0" if p == "downsample_conv" else norm_index]
    else:
      parts.append(p)
  return parts


def torch_names(collection: str, path: Tuple[str, ...],
                model: MaskRCNN = None) -> Optional[Tuple[List[str], str]]:
  """torchvision key(s) of one of our variables, and how to lay its array out.

  Args:
    collection: 'params' or 'batch_stats'.
    path: the variable's path in that collection, e.g. ('backbone', 'layer1_0', 'conv1', 'kernel').
    model: the model the path belongs to (its box head's conv count places the v2 fcs); default:
      torchvision v1's layout.

  Returns:
    (candidate torchvision keys, newest spelling first; layout) with layout one of 'conv', 'dense',
    'fc6', 'deconv', 'deconv_flipped', 'vector'; or None for a variable with no torchvision
    counterpart (a part torchvision does not have, e.g. a head registered outside the package).
  """
  top, *mid, leaf = path
  if leaf in _NORM_LEAVES and (collection == "batch_stats" or
                               (mid and re.fullmatch(r"(bn\d|downsample_bn|.*norm.*)", mid[-1]))):
    return _norm_names(top, mid, _NORM_LEAVES[leaf])
  if leaf not in ("kernel", "bias"):
    return None
  tleaf = {"kernel": "weight", "bias": "bias"}[leaf]
  layout = "vector" if leaf == "bias" else "conv"
  if top in ("backbone", "roi_trunk"):  # a C4 model's RoI trunk is the ResNet's layer4
    return [".".join(["backbone.body"] + _backbone_parts(mid, "1") + [tleaf])], layout
  if top == "fpn":
    kind, i = mid[0].rsplit("_", 1)
    return [f"backbone.fpn.{kind}.{i}.0.{tleaf}", f"backbone.fpn.{kind}.{i}.{tleaf}"], layout
  if top == "rpn":
    name = mid[1]
    m = re.fullmatch(r"conv(?:_(\d+))?", name)  # conv, conv_1, ...: the head's 3x3 convs
    if m:
      i = m[1] or "0"
      old = [f"rpn.head.conv.{tleaf}"] if i == "0" else []
      return [f"rpn.head.conv.{i}.0.{tleaf}"] + old, layout
    return [f"rpn.head.{name}.{tleaf}"], layout
  if top == "box_head":
    name = mid[0]
    m = re.fullmatch(r"conv(\d+)", name)
    if m:
      return [f"roi_heads.box_head.{int(m[1]) - 1}.0.{tleaf}"], layout
    m = re.fullmatch(r"fc(\d+)", name)
    if m:
      j = int(m[1]) - 6
      n_conv = len(model.box_head.conv_layers) if model is not None else 0
      if leaf == "kernel":
        layout = "fc6" if j == 0 else "dense"
      return [f"roi_heads.box_head.fc{j + 6}.{tleaf}",
              f"roi_heads.box_head.{n_conv + 1 + 2 * j}.{tleaf}"], layout
    if leaf == "kernel":
      layout = "dense"
    return [f"roi_heads.box_predictor.{name}.{tleaf}"], layout
  if top == "mask_head":
    name = mid[0]
    if name.startswith("mask_fcn") and name != "mask_fcn_logits":
      i = int(name[len("mask_fcn"):]) - 1
      return [f"roi_heads.mask_head.{i}.0.{tleaf}",
              f"roi_heads.mask_head.mask_fcn{i + 1}.{tleaf}"], layout
    if name == "conv5_mask" and leaf == "kernel":
      layout = "deconv"
    return [f"roi_heads.mask_predictor.{name}.{tleaf}"], layout
  if top == "keypoint_head":
    name = mid[0]
    if name == "kps_score_lowres":
      return [f"roi_heads.keypoint_predictor.{name}.{tleaf}"], (
          "deconv_flipped" if leaf == "kernel" else layout)
    m = re.fullmatch(r"kps_fcn(\d+)", name)  # Sequential(conv, ReLU, conv, ...)
    if m:
      return [f"roi_heads.keypoint_head.{2 * (int(m[1]) - 1)}.{tleaf}"], layout
  return None


def _norm_names(top: str, mid, tleaf: str) -> Optional[Tuple[List[str], str]]:
  """torchvision keys of a norm layer's variable (BatchNorm2d / FrozenBatchNorm2d / GroupNorm)."""
  if top in ("backbone", "roi_trunk"):
    return [".".join(["backbone.body"] + _backbone_parts(mid, "1") + [tleaf])], "vector"
  name = mid[-1]
  if top == "fpn":
    kind, i = name.replace("_norm", "").rsplit("_", 1)
    return [f"backbone.fpn.{kind}.{i}.1.{tleaf}"], "vector"
  m = re.fullmatch(r"(?:mask_)?norm(\d+)", name)
  if top in ("box_head", "mask_head") and m:
    return [f"roi_heads.{top}.{int(m[1]) - 1}.1.{tleaf}"], "vector"
  return None


def _to_ours(arr: np.ndarray, layout: str, pooled: int) -> np.ndarray:
  """torch layout -> ours; arrays of an unexpected rank pass through for the shape check to name."""
  if layout == "conv" and arr.ndim == 4:  # [O, I, kh, kw] -> [kh, kw, I, O]
    return arr.transpose(2, 3, 1, 0)
  if layout == "deconv" and arr.ndim == 4:  # ConvTranspose2d [I, O, kh, kw] -> [kh, kw, I, O]
    return arr.transpose(2, 3, 0, 1)
  if layout == "deconv_flipped" and arr.ndim == 4:  # the same, as a correlation: flipped
    return arr[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
  if layout == "dense" and arr.ndim == 2:  # [out, in] -> [in, out]
    return arr.T
  if layout == "fc6" and arr.ndim == 2:  # torch flattens pooled features (c, h, w); ours (h, w, c)
    out, n_in = arr.shape
    if n_in % (pooled * pooled):
      return arr.T
    c = n_in // (pooled * pooled)
    return arr.reshape(out, c, pooled, pooled).transpose(2, 3, 1, 0).reshape(n_in, out)
  return arr


def _as_numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor; no torch import needed
    v = v.detach().cpu().numpy()
  return np.asarray(v, dtype=np.float32)


def load_state_dict(state_dict_or_path: Union[str, Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  """A `.pth` path (loaded with torch, `weights_only=True`) or a mapping of tensors/arrays.

  Raises:
    ValueError: torch is not installed, or the file is not a readable state_dict.
    TypeError: what was loaded or given is not a mapping.
  """
  if isinstance(state_dict_or_path, (str, bytes)) or hasattr(state_dict_or_path, "__fspath__"):
    try:
      import torch  # only needed for .pth files
    except ImportError:
      raise ValueError(f"reading {state_dict_or_path} needs torch, which maskrcnn_jax does not "
                       "install: `pip install torch` (or pass a dict of numpy arrays)") from None
    try:
      sd = torch.load(state_dict_or_path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      raise ValueError(f"cannot read {state_dict_or_path} as a torch state_dict "
                       f"({type(e).__name__}: {first})") from None
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
      sd = sd["model"]  # torchvision reference-script checkpoints
  else:
    sd = state_dict_or_path
  if not isinstance(sd, Mapping):
    raise TypeError(f"expected a state_dict mapping or a .pth path, got {type(sd).__name__}")
  return {k: v for k, v in sd.items()}


def _match(model: MaskRCNN, sd: Mapping[str, Any], prefix: str = "", strip: str = ""):
  """Every variable of `model` paired with its torchvision key in `sd`.

  Returns (variables with the converted leaves, report) where report lists torchvision names:
  'loaded', 'missing' (with our path and shape), 'mis-shaped' (with both shapes), 'unexpected'
  (keys of sd nothing of ours reads), and 'no_counterpart' (our variables torchvision has no
  name for, as collection/path).
  """
  shapes = jax.eval_shape(lambda key: init_variables(model, key), jax.random.key(0))
  # The box head's input side: fc6 reads the pooled features (C4: res5's, averaged to 1 x 1).
  pooled = 1 if model.roi_trunk is not None else model.box_pooler.output_size
  report = {"loaded": [], "missing": [], "mis-shaped": [], "unexpected": [], "no_counterpart": []}
  used = set()
  out: Dict[str, Dict] = {}
  for collection, tree in shapes.items():
    conv = {}
    for path, spec in traverse_util.flatten_dict(tree).items():
      found = torch_names(collection, path, model)
      if found is None:
        report["no_counterpart"].append(f"{collection}/{'/'.join(path)}")
        continue
      names, layout = found
      if not names[0].startswith(prefix):
        continue
      names = [n[len(strip):] if strip and n.startswith(strip) else n for n in names]
      key = next((n for n in names if n in sd), None)
      if key is None:
        report["missing"].append(f"{names[0]} (for {collection}/{'/'.join(path)}, shape "
                                 f"{spec.shape})")
        continue
      used.add(key)
      arr = _to_ours(_as_numpy(sd[key]), layout, pooled)
      if arr.shape != spec.shape:
        report["mis-shaped"].append(f"{key} (got {tuple(_as_numpy(sd[key]).shape)}, expected "
                                    f"{spec.shape} in our layout: {layout})")
        continue
      conv[path] = jnp.asarray(arr)
      report["loaded"].append(key)
    out[collection] = traverse_util.unflatten_dict(conv)
  report["unexpected"] = sorted(k for k in sd if k not in used and not _IGNORED.match(k))
  return out, report


def _describe(report, kinds=("missing", "unexpected", "mis-shaped", "no_counterpart")) -> List[str]:
  titles = {"no_counterpart": "variables with no torchvision counterpart"}
  return [f"{titles.get(kind, kind + ' keys')} ({len(report[kind])}): " + "; ".join(report[kind])
          for kind in kinds if report[kind]]


def variables_from_state_dict(model: MaskRCNN, state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Converts a torchvision state_dict into `model`'s variables.

  Raises:
    ValueError naming every missing, unexpected and mis-shaped key, and every part of the model
    torchvision has no counterpart for (e.g. a head registered outside the package: use
    `convert_matching`, which leaves such parts to the caller's initialization).
  """
  variables, report = _match(model, dict(state_dict))
  lines = _describe(report)
  if lines:
    raise ValueError("state_dict does not fit the model:\n  " + "\n  ".join(lines))
  return variables


def _count_blocks(sd: Mapping[str, Any], stage: int) -> int:
  pattern = re.compile(rf"backbone\.body\.layer{stage}\.(\d+)\.conv1\.weight$")
  return len({m[1] for m in map(pattern.match, sd) if m})


def describe_state_dict(sd: Mapping[str, Any]) -> Dict[str, Any]:
  """Which torchvision detection model a state_dict holds, from its keys and shapes.

  Returns:
    {'version': 1 or 2, 'depth': 50 or 101 (or another ResNet's), 'mask': bool, 'num_classes':
    int, 'keypoints': K of a Keypoint R-CNN's predictor or 0, 'keypoint_layers': the widths of its
    head's convs (() without one)}.

  Raises:
    ValueError: the keys are not those of a torchvision Faster / Mask R-CNN with a ResNet-FPN.
  """
  if "roi_heads.box_predictor.cls_score.weight" not in sd or not _count_blocks(sd, 1):
    sample = ", ".join(sorted(sd)[:5])
    raise ValueError("not a torchvision Faster/Mask R-CNN ResNet-FPN state_dict (no "
                     f"roi_heads.box_predictor.cls_score.weight or backbone.body.layer1; keys "
                     f"begin {sample})")
  blocks = tuple(_count_blocks(sd, s) for s in (1, 2, 3, 4))
  depths = {v: k for k, v in _STAGES.items()}
  if blocks not in depths:
    raise ValueError(f"the backbone has {blocks} blocks per stage, not a ResNet of depths "
                     f"{sorted(_STAGES)}")
  v2 = "roi_heads.box_head.0.0.weight" in sd or "backbone.fpn.inner_blocks.0.1.weight" in sd
  kp_key = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
  kp_convs = re.compile(r"roi_heads\.keypoint_head\.(\d+)\.weight$")
  layers = sorted((int(m[1]), _as_numpy(sd[m[0]]).shape[0]) for m in map(kp_convs.match, sd) if m)
  return dict(version=2 if v2 else 1, depth=depths[blocks],
              mask=any(k.startswith("roi_heads.mask_predictor.") for k in sd),
              num_classes=int(_as_numpy(sd["roi_heads.box_predictor.cls_score.weight"]).shape[0]),
              keypoints=int(_as_numpy(sd[kp_key]).shape[1]) if kp_key in sd else 0,
              keypoint_layers=tuple(int(w) for _, w in layers))


def from_torchvision(state_dict_or_path, num_classes: Optional[int] = None,
                     backbone: Optional[str] = None, model_config=None,
                     frozen_bn_eps: float = 1e-5) -> Tuple[MaskRCNN, Dict[str, Any]]:
  """Builds the model a torchvision detection state_dict holds, and its variables.

  The model is worked out from the keys and shapes (`describe_state_dict`):
  `fasterrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn` (v1), their `_v2` forms, and
  `keypointrcnn_resnet50_fpn` (any number of keypoints), on a ResNet-50 or -101 (or other depth)
  FPN backbone, with any number of classes.

  Args:
    state_dict_or_path: `model.state_dict()` (tensors or numpy arrays), or a `.pth` path. Both the
      BatchNorm2d form (random init) and the FrozenBatchNorm2d form (published weights) load.
    num_classes: including background; None: as the state_dict holds (checked when given).
    backbone: 'resnet50' or 'resnet101'; None: as the state_dict holds (checked when given).
    model_config: optional `config.model` tree to build instead of torchvision's defaults.
    frozen_bn_eps: the backbone norm's epsilon (state_dicts do not hold it): torchvision's
      constructors use 1e-5, and its published v1 COCO weights were evaluated with 0
      (`frozen_bn_eps=0.0`).

  Returns:
    (model, variables) with variables = {'params': ..., 'batch_stats': ...}.

  Raises:
    ValueError: the state_dict is not such a model, does not fit `model_config`, or disagrees
      with `num_classes` / `backbone`.
  """
  if backbone is not None and backbone not in _BACKBONES:
    raise ValueError(f"backbone must be one of {sorted(_BACKBONES)}, got {backbone!r}")
  sd = load_state_dict(state_dict_or_path)
  if model_config is None:
    found = describe_state_dict(sd)
    if backbone is not None and _BACKBONES[backbone] != found["depth"]:
      raise ValueError(f"backbone={backbone!r}, but the state_dict holds a "
                       f"ResNet-{found['depth']} backbone")
    if num_classes is not None and int(num_classes) != found["num_classes"]:
      raise ValueError(f"num_classes={num_classes}, but the state_dict's box predictor "
                       f"(roi_heads.box_predictor.cls_score) has {found['num_classes']} classes")
    model_config = torchvision_model_config(found["depth"], found["num_classes"],
                                            found["version"], found["mask"], found["keypoints"])
    if found["keypoints"]:
      model_config.keypoint_head.conv_layers = found["keypoint_layers"]
    model_config.backbone.norm_eps = float(frozen_bn_eps)
  model = build_model(model_config)
  return model, variables_from_state_dict(model, sd)


def convert_matching(model: MaskRCNN, state_dict: Mapping[str, Any], prefix: str = "",
                     strip: str = "") -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
  """The variables of `model` that a state_dict holds with the right shape, and what it lacks.

  Lenient `variables_from_state_dict`: for fine-tuning from weights of another configuration
  (e.g. other num_classes, or a head torchvision does not have), where the caller keeps its own
  initialization of what is left out.

  Args:
    model: the MaskRCNN to fill.
    state_dict: torchvision names -> tensors or arrays.
    prefix: only our variables whose torchvision name starts with it (e.g. 'backbone.body.').
    strip: removed from the front of our torchvision names before the lookup ('backbone.body.'
      for a plain torchvision ResNet's state_dict, whose keys are 'conv1.weight', 'layer1.0...').

  Returns:
    (variables, report): variables {'params': ..., 'batch_stats': ...} (nested dicts with only the
    converted leaves), report {'loaded', 'missing', 'mis-shaped', 'unexpected',
    'no_counterpart'} lists ('mis-shaped' entries also give both shapes; 'no_counterpart' names
    our variables torchvision has no key for).
  """
  return _match(model, dict(state_dict), prefix, strip)


def variables_from_resnet_state_dict(model: MaskRCNN, state_dict_or_path) -> Dict[str, Any]:
  """An ImageNet torchvision ResNet (`resnet50`, `resnet101`) state_dict -> the backbone variables.

  Keys are torchvision's classification names ('conv1.weight', 'layer1.0.bn1.running_mean', ...):
  the Mask R-CNN names of `torch_names` with 'backbone.body.' stripped. The classifier ('fc.*') is
  ignored. BatchNorm weights and statistics become the backbone norm's variables.

  Returns:
    {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}} (and 'roi_trunk', layer4, in
    C4 models).

  Raises:
    ValueError naming every missing, mis-shaped or unexpected (non-'fc') key.
  """
  sd = load_state_dict(state_dict_or_path)
  variables, report = convert_matching(model, sd, prefix="backbone.body.",
                                       strip="backbone.body.")
  report = dict(report, unexpected=[k for k in report["unexpected"] if not k.startswith("fc.")])
  lines = _describe(report, ("missing", "mis-shaped", "unexpected"))
  if lines:
    raise ValueError("ResNet state_dict does not fit the backbone:\n  " + "\n  ".join(lines))
  return variables
