"""Initial variables: random, then optionally torchvision weights laid over them.

`config.init.torchvision_checkpoint`: a torchvision Mask R-CNN state_dict (`.pth`); every variable
it holds with the right shape is loaded, the rest (e.g. the class-dependent predictors when
num_classes differs) keeps its random initialization and is reported.
`config.init.imagenet_resnet`: a torchvision ImageNet ResNet state_dict (`resnet50`/`resnet101`
keys such as 'conv1.weight'); the backbone is loaded, everything else is random.
"""
import logging
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from maskrcnn_jax.convert import torchvision as tv_convert
from maskrcnn_jax.modeling.mask_rcnn import init_variables
from maskrcnn_jax.training.errors import ConfigError

log = logging.getLogger(__name__)


def random_variables(model, seed: int) -> Dict[str, Any]:
  """`{'params', 'batch_stats'}` of `model`, randomly initialized from `seed`."""
  # The 'rbg' generator compiles about twice as fast as threefry here (seconds on a CPU).
  init = jax.jit(lambda key: init_variables(model, key))
  return init(jax.random.key(seed, impl="rbg"))


def overlay(variables: Mapping[str, Any], loaded: Mapping[str, Any]) -> Dict[str, Any]:
  """`variables` with every leaf present in `loaded` (same nesting) replaced."""
  out = {}
  for collection, tree in variables.items():
    flat = traverse_util.flatten_dict(dict(tree))
    new = traverse_util.flatten_dict(dict(loaded.get(collection, {})))
    unknown = set(new) - set(flat)
    if unknown:
      raise ValueError(f"loaded variables not in the model: {sorted(unknown)[:5]}")
    flat.update({k: jnp.asarray(v, flat[k].dtype) for k, v in new.items()})
    out[collection] = traverse_util.unflatten_dict(flat)
  return out


def _summary(names, limit=8):
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def initial_variables(model, init_config: Mapping[str, Any], seed: int) -> Dict[str, Any]:
  """Random variables, with `config.init`'s weights laid over them (see the module docstring).

  Raises:
    ConfigError: both init sources are given, a file cannot be read (or torch is missing), the
      ImageNet state_dict does not fit the backbone, or the Mask R-CNN state_dict provides nothing
      usable.
  """
  init_config = dict(init_config or {})
  tv_path = init_config.get("torchvision_checkpoint") or ""
  imagenet_path = init_config.get("imagenet_resnet") or ""
  if tv_path and imagenet_path:
    raise ConfigError("set only one of config.init.torchvision_checkpoint and "
                      "config.init.imagenet_resnet")
  variables = random_variables(model, seed)
  try:
    return _load_over(model, variables, tv_path, imagenet_path)
  except (ValueError, TypeError) as e:  # unreadable file, torch missing, nothing that fits
    key = "torchvision_checkpoint" if tv_path else "imagenet_resnet"
    raise ConfigError(f"config.init.{key}: {e}") from None


def _load_over(model, variables, tv_path: str, imagenet_path: str) -> Dict[str, Any]:
  if imagenet_path:
    loaded = tv_convert.variables_from_resnet_state_dict(model, imagenet_path)
    n = len(traverse_util.flatten_dict(loaded["params"]))
    log.info("loaded the ImageNet backbone from %s (%d parameter arrays); the rest (FPN, heads) "
             "is random", imagenet_path, n)
    return overlay(variables, loaded)
  if tv_path:
    loaded, report = tv_convert.convert_matching(
        model, tv_convert.load_state_dict(tv_path))
    if not report["loaded"]:
      raise ValueError(f"{tv_path} holds no torchvision Mask R-CNN weight this model can use "
                       f"(missing: {_summary(report['missing'])})")
    log.info("loaded %d arrays from %s", len(report["loaded"]), tv_path)
    if report["mis-shaped"]:
      log.warning("re-initialized (shapes differ from the checkpoint): %s",
                  _summary(report["mis-shaped"]))
    if report["missing"]:
      log.warning("re-initialized (not in the checkpoint): %s", _summary(report["missing"]))
    if report["unexpected"]:
      log.warning("ignored (not in this model): %s", _summary(report["unexpected"]))
    if report["no_counterpart"]:
      log.info("kept random (no torchvision counterpart): %s", _summary(report["no_counterpart"]))
    variables = overlay(variables, loaded)
    variables["init_report"] = report
    return variables
  return variables
