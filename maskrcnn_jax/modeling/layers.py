"""Small building blocks shared by the backbone and heads."""
from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Dtype = Any


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, use_bias: bool = True,
         dtype: Dtype = jnp.float32, name: str = None) -> nn.Conv:
  """A torch-style conv: symmetric explicit padding (never 'SAME', which pads stride-2 convs
  asymmetrically and would shift every feature by half a pixel relative to torchvision)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine terms, as torchvision's `FrozenBatchNorm2d`.

  All four tensors live in the `batch_stats` collection, so they never receive gradients or optimizer
  state; `y = x * scale + shift` with `scale = weight / sqrt(running_var + eps)`.
  """
  eps: float = 1e-5
  """Added to the variance (torchvision's default)."""
  dtype: Dtype = jnp.float32
  """Compute dtype of the output."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    weight = self.variable("batch_stats", "weight", lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable("batch_stats", "running_mean", lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable("batch_stats", "running_var", lambda: jnp.ones((c,), jnp.float32)).value
    scale = weight * jnp.reciprocal(jnp.sqrt(var + self.eps))
    shift = bias - mean * scale
    return (x * scale.astype(self.dtype) + shift.astype(self.dtype)).astype(self.dtype)


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
  """`F.interpolate(x, size, mode='nearest')` for NHWC x: src = floor(dst * (in / out)) in float32."""
  h, w = x.shape[1:3]
  ys = np.minimum(np.floor(np.arange(size[0], dtype=np.float32) * (np.float32(h) / np.float32(size[0]))), h - 1)
  xs = np.minimum(np.floor(np.arange(size[1], dtype=np.float32) * (np.float32(w) / np.float32(size[1]))), w - 1)
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
