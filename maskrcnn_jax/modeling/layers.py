"""Small building blocks shared by the backbone and heads."""
import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax.ops.conv import conv_general_dilated

Dtype = Any

Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
"""`nn.Conv` (same variables, same forward) whose kernel gradient runs as per-tap matmuls on CPU
(`ops.conv`); every conv of the models is built with it."""


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, use_bias: bool = True,
         dtype: Dtype = jnp.float32, name: str = None) -> nn.Module:
  """A torch-style conv: symmetric explicit padding (never 'SAME', which pads stride-2 convs
  asymmetrically and would shift every feature by half a pixel relative to torchvision)."""
  return Conv(features, (kernel, kernel), strides=(stride, stride),
              padding=((padding, padding), (padding, padding)), use_bias=use_bias,
              dtype=dtype, param_dtype=jnp.float32, name=name)


class Conv1x1PerLabel(nn.Module):
  """A 1x1 conv to `features` channels with nn.Conv's variables (`kernel` [1, 1, C, features],
  `bias` [features]; the same names, shapes and init, so weights convert as for `conv`) that,
  given each row's label, computes only that row's channel.

  Per-class predictors whose loss reads one class per row (the per-class sigmoid mask loss) pay
  for 1 channel instead of `features`: the label's kernel column is picked with a one-hot
  contraction (its gradient dense, no scatter), then contracted with the row's features.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels=None):
    """x: [N, H, W, C]; labels: [N] int32 in [0, features) or None.

    Returns [N, H, W, features] (labels None) or [N, H, W, 1], the labelled channel."""
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    w = kernel[0, 0].astype(self.dtype)  # [C, K]
    b = bias.astype(self.dtype)
    if labels is None:
      return jnp.einsum("nhwc,ck->nhwk", x, w) + b
    hot = (labels[:, None] == jnp.arange(self.features)).astype(self.dtype)  # [N, K]
    w_row = jnp.einsum("ck,nk->nc", w, hot)
    b_row = jnp.einsum("k,nk->n", b, hot)
    return (jnp.einsum("nhwc,nc->nhw", x, w_row) + b_row[:, None, None])[..., None]


NORM_TYPES = ("none", "frozen_bn", "bn", "bn_frozen_stats", "gn")
"""Normalization layers a config section may ask for (`norm`):

  none             no normalization (convs then carry a bias);
  frozen_bn        torchvision's FrozenBatchNorm2d: statistics and affine terms fixed, all four in
                   'batch_stats' (nothing trains); v1 backbones;
  bn               BatchNorm: affine terms trained ('params' scale, bias), in training normalized by
                   the batch's statistics, reduced over every device of the data axis
                   (SyncBatchNorm)
                   and over valid rows only, and running statistics updated ('batch_stats'); at
                   inference the running statistics; torchvision's v2 models;
  bn_frozen_stats  the same parameters, but the running statistics are used (and kept) in training
                   too: for fine-tuning with small batches;
  gn               GroupNorm with `GROUPS` groups (Detectron2's GN heads); no statistics.
"""
GROUPS = 32


def check_norm(kind: str, where: str, widths: Sequence[int] = ()) -> None:
  """Raises ValueError unless `kind` is one of NORM_TYPES (`where` names the config key) and, for
  'gn', every channel count in `widths` divides into `GROUPS` groups."""
  if kind not in NORM_TYPES:
    raise ValueError(f"{where} must be one of {NORM_TYPES}, got {kind!r}")
  odd = [int(w) for w in widths if int(w) % GROUPS]
  if kind == "gn" and odd:
    raise ValueError(f"{where}='gn' needs channels divisible by {GROUPS}; got {odd}")


def frozen(kind: str, is_frozen: bool) -> str:
  """The norm kind of a layer whose statistics are frozen (`training.frozen_stages`): 'bn' keeps
  its running statistics ('bn_frozen_stats'); the other kinds are unchanged."""
  return "bn_frozen_stats" if kind == "bn" and is_frozen else kind


class Norm(nn.Module):
  """One normalization layer of kind `kind` (see NORM_TYPES), torchvision-equal at inference.

  Variables (torchvision names in brackets): frozen_bn: batch_stats weight, bias, running_mean,
  running_var; bn / bn_frozen_stats: params scale [weight], bias; batch_stats running_mean,
  running_var; gn: params scale [weight], bias.
  """
  kind: str = "frozen_bn"
  eps: float = 1e-5
  """Added to the variance (torchvision's default; its published v1 COCO weights use 0)."""
  momentum: float = 0.1
  """bn: running = (1 - momentum) * running + momentum * batch (torch's convention)."""
  dtype: Dtype = jnp.float32
  """Compute dtype of the output."""

  @nn.compact
  def __call__(self, x, train: bool = False, axis_name: Optional[str] = None, mask=None):
    """x: [N, ..., C]; mask: [N] bool rows that count in batch statistics (None: all).

    `axis_name`: the mapped axis over which batch statistics are averaged in training (the data
    axis of the train step), or None (this device's batch only).
    """
    c = x.shape[-1]
    f32 = jnp.float32
    if self.kind == "none":
      return x
    if self.kind == "gn":
      if c % GROUPS:
        raise ValueError(f"GroupNorm needs channels divisible by {GROUPS}, got {c}")
      scale = self.param("scale", nn.initializers.ones, (c,), f32)
      bias = self.param("bias", nn.initializers.zeros, (c,), f32)
      xf = x.astype(f32)
      g = xf.reshape(x.shape[:-1] + (GROUPS, c // GROUPS))
      axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
      mean = jnp.mean(g, axis=axes, keepdims=True)
      var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
      y = ((g - mean) * lax.rsqrt(var + self.eps)).reshape(x.shape)
      return (y * scale + bias).astype(self.dtype)
    if self.kind == "frozen_bn":
      weight = self.variable("batch_stats", "weight", lambda: jnp.ones((c,), f32)).value
      bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), f32)).value
    elif self.kind in ("bn", "bn_frozen_stats"):
      weight = self.param("scale", nn.initializers.ones, (c,), f32)
      bias = self.param("bias", nn.initializers.zeros, (c,), f32)
    else:
      check_norm(self.kind, "norm")
    mean_v = self.variable("batch_stats", "running_mean", lambda: jnp.zeros((c,), f32))
    var_v = self.variable("batch_stats", "running_var", lambda: jnp.ones((c,), f32))
    batch_stats = train and self.kind == "bn"
    if not batch_stats:
      # y = x * scale + shift, as FrozenBatchNorm2d computes it (BatchNorm2d in eval mode too, up
      # to float rounding).
      scale = weight * jnp.reciprocal(jnp.sqrt(var_v.value + self.eps))
      shift = bias - mean_v.value * scale
      return (x * scale.astype(self.dtype) + shift.astype(self.dtype)).astype(self.dtype)
    xf = x.astype(f32)
    axes = tuple(range(x.ndim - 1))
    per_row = int(np.prod(x.shape[1:-1]))
    if mask is None:
      m = jnp.ones(x.shape[:1], f32)
    else:
      m = mask.astype(f32)
    m = m.reshape((-1,) + (1,) * (x.ndim - 1))
    count = jnp.sum(m) * per_row
    total = jnp.sum(xf * m, axis=axes)
    if axis_name is not None:
      count, total = lax.psum((count, total), axis_name)
    mean = total / jnp.maximum(count, 1.0)
    sq = jnp.sum(jnp.square(xf - mean) * m, axis=axes)
    if axis_name is not None:
      sq = lax.psum(sq, axis_name)
    var = sq / jnp.maximum(count, 1.0)
    if not self.is_initializing():
      # torch updates the running variance with the unbiased estimate; an empty batch (no valid
      # row anywhere) leaves the statistics as they were.
      unbiased = sq / jnp.maximum(count - 1.0, 1.0)
      mom = jnp.where(count > 1, self.momentum, 0.0)
      mean_v.value = (1.0 - mom) * mean_v.value + mom * lax.stop_gradient(mean)
      var_v.value = (1.0 - mom) * var_v.value + mom * lax.stop_gradient(unbiased)
    y = (xf - mean) * (weight * lax.rsqrt(var + self.eps)) + bias
    return y.astype(self.dtype)


class ConvTranspose2x2(nn.Module):
  """ConvTranspose2d(kernel 2, stride 2, padding 0): every input pixel becomes a 2x2 output block.

  Written as one einsum so it equals torch's op exactly, with the kernel stored `[2, 2, in, out]`.
  """
  features: int
  """Output channels."""
  dtype: Dtype = jnp.float32
  """Compute dtype."""

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.kaiming_normal(), (2, 2, c, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = jnp.einsum("nhwc,abco->nhawbo", x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


def nearest_upsample_to(x, size: Tuple[int, int]):
  """`F.interpolate(x, size, mode='nearest')` for NHWC x: src = floor(dst * (in / out)) in
  float32."""
  h, w = x.shape[1:3]
  def src(n_out, n_in):
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale), n_in - 1)
  ys, xs = src(size[0], h), src(size[1], w)
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, ys.astype(np.int32)][:, :, xs.astype(np.int32)]


def mask_to_extent(x, sizes, level: int):
  """Zeroes features beyond each image's own padded extent.

  torchvision pads every image of a batch of one to a multiple of 32 and its convs zero-pad at that
  border. On a larger bucketed canvas the pixels past that border are zeros too, but their features
  are not (BN shifts and biases), so before every conv that reads neighbours we zero them: the
  features inside the extent then equal torchvision's exactly, whatever the canvas.

  Args:
    x: [B, H, W, C] features at stride 2**level.
    sizes: [B, 2] int32 (h, w) padded image sizes, or None (no masking: the canvas is the extent).
    level: log2 of x's stride.
  """
  if sizes is None:
    return x
  from maskrcnn_jax.ops.anchors import feature_grid_size
  ext = feature_grid_size(sizes.astype(jnp.int32), level)  # [B, 2]
  h, w = x.shape[1:3]
  keep = ((jnp.arange(h)[None, :, None] < ext[:, 0, None, None])
          & (jnp.arange(w)[None, None, :] < ext[:, 1, None, None]))
  return x * keep[..., None].astype(x.dtype)
