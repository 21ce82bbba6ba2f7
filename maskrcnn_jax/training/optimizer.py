"""SGD with momentum as torchvision's detection reference trains, built with optax.

    tx = make_optimizer(config.training, params)

is, per trainable parameter and step t (torch.optim.SGD semantics, clipping first):

    g = clip_by_global_norm(grads, clip_grad_norm)     # only if clip_grad_norm > 0
    d = g + weight_decay * p                           # only on kernels, unless
                                                       #   weight_decay_norm_and_bias
    buf = momentum * buf + d
    p = p - learning_rate(t) * buf

and exactly zero for frozen parameters (`frozen_stages`), which keep no optimizer state.
"""
import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from maskrcnn_jax.training.errors import ConfigError

TRAIN, FROZEN = "train", "frozen"


def learning_rate_schedule(training: Mapping[str, Any]) -> Callable[[Any], Any]:
  """Learning rate as a function of the update count t (0 for the first update).

  Linear warm-up from `learning_rate * warmup_factor` at t = 0 to `learning_rate` at
  t = warmup_steps (torch's LinearLR), multiplied by the decay:
    'step': `decay_factor ** (number of decay_steps <= t)` (torch's MultiStepLR);
    'cosine': from 1 at t = warmup_steps to `min_lr_factor` at t = steps.
  """
  base = float(training["learning_rate"])
  warmup = int(training.get("warmup_steps", 0))
  warmup_factor = float(training.get("warmup_factor", 0.001))
  schedule = training.get("schedule", "step")
  total = int(training["steps"])
  if schedule == "step":
    boundaries = jnp.asarray(sorted(int(s) for s in training.get("decay_steps", ())) or [-1],
                             jnp.int32)
    has_boundaries = bool(training.get("decay_steps", ()))
    factor = float(training.get("decay_factor", 0.1))
  elif schedule == "cosine":
    floor = float(training.get("min_lr_factor", 0.0))
  else:
    raise ConfigError(f"training.schedule must be 'step' or 'cosine', got {schedule!r}")

  def fn(t):
    t = jnp.asarray(t, jnp.int32)
    tf = t.astype(jnp.float32)
    if warmup > 0:
      warm = jnp.where(t < warmup, warmup_factor + (1 - warmup_factor) * tf / warmup, 1.0)
    else:
      warm = jnp.float32(1.0)
    if schedule == "step":
      n = jnp.sum(t >= boundaries) if has_boundaries else 0
      decay = jnp.power(jnp.float32(factor), n)
    else:
      span = max(total - warmup, 1)
      frac = jnp.clip((tf - warmup) / span, 0.0, 1.0)
      decay = floor + (1 - floor) * 0.5 * (1 + jnp.cos(math.pi * frac))
    return (base * warm * decay).astype(jnp.float32)
  return fn


def frozen_prefixes(frozen_stages: int):
  """Parameter path prefixes frozen by `training.frozen_stages`.

  0 freezes nothing (torchvision's trainable_layers=5); k in 1..4 freezes the stem (conv1, bn1)
  and layer1..layer{k} (k=1 is torchvision's default trainable_layers=3; Detectron2's
  FREEZE_AT=k+1). Norm statistics are in 'batch_stats', outside the parameters; those of frozen
  stages also stay at their running values in training (`build_model(frozen_stages=k)`).
  """
  k = int(frozen_stages)
  if not 0 <= k <= 4:
    raise ConfigError(f"training.frozen_stages must be in 0..4, got {k}")
  if k == 0:
    return ()
  # A C4 model's layer4 is its RoI trunk.
  return (("backbone", "conv1"), ("backbone", "bn1")) + tuple(
      ("backbone", f"layer{i}") for i in range(1, k + 1)) + (
          (("roi_trunk", "layer4"),) if k == 4 else ())


def _is_frozen(path, prefixes) -> bool:
  # ('backbone', 'layer1') covers the blocks 'layer1_0', 'layer1_1', ...
  return any(len(path) > 1 and path[0] == top and re.fullmatch(rf"{name}(_\d+)?", path[1])
             for top, name in prefixes)


def trainable_labels(params, frozen_stages: int):
  """The params tree with each leaf replaced by 'train' or 'frozen'."""
  prefixes = frozen_prefixes(frozen_stages)
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {p: FROZEN if _is_frozen(p, prefixes) else TRAIN for p in flat})


def weight_decay_mask(params, decay_norm_and_bias: bool = False):
  """True where weight decay applies: kernels (ndim > 1); biases and norm scales/offsets
  (ndim <= 1) only with `decay_norm_and_bias`."""
  return jax.tree.map(lambda p: bool(decay_norm_and_bias) or p.ndim > 1, params)


def make_optimizer(training: Mapping[str, Any], params) -> optax.GradientTransformation:
  """The optax transformation for `config.training` over `params` (a params tree or its shapes).

  Config fields: learning_rate, momentum, weight_decay, weight_decay_norm_and_bias, warmup_steps,
  warmup_factor, schedule, decay_steps, decay_factor, min_lr_factor, steps, clip_grad_norm,
  frozen_stages (see `learning_rate_schedule` and `frozen_prefixes`).
  """
  parts = []
  clip = float(training.get("clip_grad_norm", 0.0))
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  wd = float(training.get("weight_decay", 0.0))
  if wd > 0:
    parts.append(optax.add_decayed_weights(
        wd, mask=weight_decay_mask(params, training.get("weight_decay_norm_and_bias", False))))
  momentum = float(training.get("momentum", 0.9))
  parts.append(optax.sgd(learning_rate_schedule(training), momentum=momentum or None,
                         nesterov=bool(training.get("nesterov", False))))
  sgd = optax.chain(*parts)
  labels = trainable_labels(params, training.get("frozen_stages", 0))
  return optax.multi_transform({TRAIN: sgd, FROZEN: optax.set_to_zero()}, labels)


def trainable_mask(params, frozen_stages: int):
  """True for trained leaves (for gradient norms over what is actually trained)."""
  return jax.tree.map(lambda l: l == TRAIN, trainable_labels(params, frozen_stages))
