"""torchvision Mask R-CNN `state_dict` -> maskrcnn_jax variables (numpy only; torch only for `.pth`).

Every one of our variables has exactly one torchvision name (`torch_names` lists the spellings that
torchvision releases used), so a state_dict converts one to one and any missing, unexpected or
mis-shaped key is reported by name.
"""
import pickle
import re
from typing import Any, Dict, List, Mapping, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from maskrcnn_jax.modeling.builder import build_model, torchvision_model_config
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN

_BACKBONES = {"resnet50": 50, "resnet101": 101}
_IGNORED = re.compile(r".*num_batches_tracked$")


def torch_names(collection: str, path: Tuple[str, ...]) -> Tuple[List[str], str]:
  """torchvision key(s) of one of our variables, and how to lay its array out.

  Args:
    collection: 'params' or 'batch_stats'.
    path: the variable's path in that collection, e.g. ('backbone', 'layer1_0', 'conv1', 'kernel').

  Returns:
    (candidate torchvision keys, newest spelling first; layout) with layout one of 'conv', 'dense',
    'fc6', 'deconv', 'vector'.
  """
  top, *mid, leaf = path
  if collection == "batch_stats":  # FrozenBatchNorm / BatchNorm2d buffers
    if top != "backbone":
      raise KeyError(path)
    parts = []
    for p in mid:
      m = re.fullmatch(r"layer(\d)_(\d+)", p)
      parts += [f"layer{m[1]}", m[2]] if m else (["downsample", "1"] if p == "downsample_bn" else [p])
    return [".".join(["backbone.body"] + parts + [leaf])], "vector"
  tleaf = {"kernel": "weight", "bias": "bias"}[leaf]
  layout = "vector" if leaf == "bias" else "conv"
  if top == "backbone":
    parts = []
    for p in mid:
      m = re.fullmatch(r"layer(\d)_(\d+)", p)
      parts += [f"layer{m[1]}", m[2]] if m else (["downsample", "0"] if p == "downsample_conv" else [p])
    return [".".join(["backbone.body"] + parts + [tleaf])], layout
  if top == "fpn":
    kind, i = mid[0].rsplit("_", 1)
    return [f"backbone.fpn.{kind}.{i}.0.{tleaf}", f"backbone.fpn.{kind}.{i}.{tleaf}"], layout
  if top == "rpn":
    name = mid[1]
    if name == "conv":
      return [f"rpn.head.conv.0.0.{tleaf}", f"rpn.head.conv.{tleaf}"], layout
    return [f"rpn.head.{name}.{tleaf}"], layout
  if top == "box_head":
    name = mid[0]
    owner = "box_head" if name in ("fc6", "fc7") else "box_predictor"
    if leaf == "kernel":
      layout = "fc6" if name == "fc6" else "dense"
    return [f"roi_heads.{owner}.{name}.{tleaf}"], layout
  if top == "mask_head":
    name = mid[0]
    if name.startswith("mask_fcn") and name != "mask_fcn_logits":
      i = int(name[len("mask_fcn"):]) - 1
      return [f"roi_heads.mask_head.{i}.0.{tleaf}", f"roi_heads.mask_head.mask_fcn{i + 1}.{tleaf}"], layout
    if name == "conv5_mask" and leaf == "kernel":
      layout = "deconv"
    return [f"roi_heads.mask_predictor.{name}.{tleaf}"], layout
  raise KeyError(path)


def _to_ours(arr: np.ndarray, layout: str, pooled: int) -> np.ndarray:
  """torch layout -> ours; arrays of an unexpected rank pass through for the shape check to name."""
  if layout == "conv" and arr.ndim == 4:  # [O, I, kh, kw] -> [kh, kw, I, O]
    return arr.transpose(2, 3, 1, 0)
  if layout == "deconv" and arr.ndim == 4:  # ConvTranspose2d [I, O, kh, kw] -> [kh, kw, I, O]
    return arr.transpose(2, 3, 0, 1)
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


def variables_from_state_dict(model: MaskRCNN, state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Converts a torchvision state_dict into `model`'s variables.

  Raises:
    ValueError naming every missing, unexpected and mis-shaped key.
  """
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.array([[64, 64]]),
      jnp.array([[64, 64]]))
  sd = dict(state_dict)
  used, missing, misshaped = set(), [], []
  out: Dict[str, Dict] = {}
  for collection, tree in shapes.items():
    flat = traverse_util.flatten_dict(jax.tree.map(lambda s: s, tree))
    conv = {}
    for path, spec in flat.items():
      names, layout = torch_names(collection, path)
      key = next((n for n in names if n in sd), None)
      if key is None:
        missing.append(f"{names[0]} (for {collection}/{'/'.join(path)}, shape {spec.shape})")
        continue
      used.add(key)
      arr = _to_ours(_as_numpy(sd[key]), layout, model.roi_align.box_output_size)
      if arr.shape != spec.shape:
        misshaped.append(f"{key}: got {tuple(_as_numpy(sd[key]).shape)}, "
                         f"expected {spec.shape} in our layout ({layout})")
        continue
      conv[path] = jnp.asarray(arr)
    out[collection] = traverse_util.unflatten_dict(conv)
  unexpected = sorted(k for k in sd if k not in used and not _IGNORED.match(k))
  if missing or unexpected or misshaped:
    lines = []
    if missing:
      lines.append(f"missing keys ({len(missing)}): " + "; ".join(missing))
    if unexpected:
      lines.append(f"unexpected keys ({len(unexpected)}): " + "; ".join(unexpected))
    if misshaped:
      lines.append(f"mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped))
    raise ValueError("state_dict does not fit the model:\n  " + "\n  ".join(lines))
  return out


def from_torchvision(state_dict_or_path, num_classes: int = 91, backbone: str = "resnet50",
                     model_config=None) -> Tuple[MaskRCNN, Dict[str, Any]]:
  """Builds a torchvision-v1-configured MaskRCNN and its variables from a torchvision state_dict.

  Args:
    state_dict_or_path: `model.state_dict()` (tensors or numpy arrays), or a `.pth` path. Both the
      BatchNorm2d form (random init) and the FrozenBatchNorm2d form (published weights) load.
    num_classes: including background (91 for torchvision's COCO weights).
    backbone: 'resnet50' or 'resnet101'.
    model_config: optional `config.model` tree to build instead of torchvision's defaults.

  Returns:
    (model, variables) with variables = {'params': ..., 'batch_stats': ...}.
  """
  if backbone not in _BACKBONES:
    raise ValueError(f"backbone must be one of {sorted(_BACKBONES)}, got {backbone!r}")
  cfg = model_config or torchvision_model_config(_BACKBONES[backbone], num_classes)
  model = build_model(cfg)
  return model, variables_from_state_dict(model, load_state_dict(state_dict_or_path))


def convert_matching(model: MaskRCNN, state_dict: Mapping[str, Any], prefix: str = "",
                     strip: str = "") -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
  """The variables of `model` that a state_dict holds with the right shape, and what it lacks.

  Lenient `variables_from_state_dict`: for fine-tuning from weights of another configuration
  (e.g. other num_classes), where the caller keeps its own initialization of what is left out.

  Args:
    model: the MaskRCNN to fill.
    state_dict: torchvision names -> tensors or arrays.
    prefix: only our variables whose torchvision name starts with it (e.g. 'backbone.body.').
    strip: removed from the front of our torchvision names before the lookup ('backbone.body.'
      for a plain torchvision ResNet's state_dict, whose keys are 'conv1.weight', 'layer1.0...').

  Returns:
    (variables, report): variables {'params': ..., 'batch_stats': ...} (nested dicts with only the
    converted leaves), report {'loaded': [...], 'missing': [...], 'mis-shaped': [...],
    'unexpected': [...]} of torchvision names ('mis-shaped' entries also give both shapes).
  """
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.array([[64, 64]]),
      jnp.array([[64, 64]]))
  sd = dict(state_dict)
  report = {"loaded": [], "missing": [], "mis-shaped": [], "unexpected": []}
  used = set()
  out: Dict[str, Dict] = {}
  for collection, tree in shapes.items():
    conv = {}
    for path, spec in traverse_util.flatten_dict(tree).items():
      names, layout = torch_names(collection, path)
      if not names[0].startswith(prefix):
        continue
      names = [n[len(strip):] if strip and n.startswith(strip) else n for n in names]
      key = next((n for n in names if n in sd), None)
      if key is None:
        report["missing"].append(names[0])
        continue
      used.add(key)
      arr = _to_ours(_as_numpy(sd[key]), layout, model.roi_align.box_output_size)
      if arr.shape != spec.shape:
        report["mis-shaped"].append(
            f"{key} (got {tuple(_as_numpy(sd[key]).shape)}, want {spec.shape} in our layout)")
        continue
      conv[path] = jnp.asarray(arr)
      report["loaded"].append(key)
    out[collection] = traverse_util.unflatten_dict(conv)
  report["unexpected"] = sorted(k for k in sd if k not in used and not _IGNORED.match(k))
  return out, report


def variables_from_resnet_state_dict(model: MaskRCNN, state_dict_or_path) -> Dict[str, Any]:
  """An ImageNet torchvision ResNet (`resnet50`, `resnet101`) state_dict -> the backbone variables.

  Keys are torchvision's classification names ('conv1.weight', 'layer1.0.bn1.running_mean', ...):
  the Mask R-CNN names of `torch_names` with 'backbone.body.' stripped. The classifier ('fc.*') is
  ignored. BatchNorm weights and statistics become our frozen BatchNorm's `batch_stats`.

  Returns:
    {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}}.

  Raises:
    ValueError naming every missing, mis-shaped or unexpected (non-'fc') key.
  """
  sd = load_state_dict(state_dict_or_path)
  variables, report = convert_matching(model, sd, prefix="backbone.body.",
                                       strip="backbone.body.")
  unexpected = [k for k in report["unexpected"] if not k.startswith("fc.")]
  lines = []
  for kind, items in (("missing", report["missing"]), ("mis-shaped", report["mis-shaped"]),
                      ("unexpected", unexpected)):
    if items:
      lines.append(f"{kind} keys ({len(items)}): " + "; ".join(items))
  if lines:
    raise ValueError("ResNet state_dict does not fit the backbone:\n  " + "\n  ".join(lines))
  return variables
