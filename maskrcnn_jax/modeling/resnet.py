"""ResNet-50/101 with frozen BatchNorm, as torchvision's `resnet50` under `resnet_fpn_backbone`."""
from typing import Any, Dict, Sequence

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import FrozenBatchNorm, conv, mask_to_extent

_STAGES = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: the stride sits in the 3x3 conv)."""
  width: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, sizes=None, level: int = 2):
    """x: [B, H, W, C] at stride 2**level; sizes: [B, 2] padded image sizes or None."""
    out_ch = self.width * 4
    y = conv(self.width, 1, use_bias=False, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn1")(y))
    y = mask_to_extent(y, sizes, level)
    y = conv(self.width, 3, self.stride, 1, use_bias=False, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn2")(y))
    y = conv(out_ch, 1, use_bias=False, dtype=self.dtype, name="conv3")(y)
    y = FrozenBatchNorm(dtype=self.dtype, name="bn3")(y)
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = conv(out_ch, 1, self.stride, use_bias=False, dtype=self.dtype, name="downsample_conv")(x)
      x = FrozenBatchNorm(dtype=self.dtype, name="downsample_bn")(x)
    return nn.relu(y + x.astype(y.dtype))


class ResNet(nn.Module):
  """ResNet body returning C2..C5 (strides 4, 8, 16, 32) as a dict {'c2': ..., 'c5': ...}."""
  depth: int = 50
  """50 or 101 (152 also works); selects the number of bottlenecks per stage."""
  width_per_group: int = 64
  """Bottleneck width of the first stage; 8 or 16 give the tiny test backbones."""
  stage_blocks: Sequence[int] = ()
  """Overrides the blocks per stage (e.g. (1, 1, 1, 1) for tests); empty means the depth's."""
  dtype: Any = jnp.float32
  """Compute dtype (bfloat16 for mixed precision); parameters stay float32."""

  @nn.compact
  def __call__(self, x, sizes=None) -> Dict[str, jnp.ndarray]:
    """x: [B, H, W, 3] normalized image; sizes: [B, 2] int32 padded image sizes (see
    `mask_to_extent`) or None. Returns {'c2'..'c5': [B, H/2**l, W/2**l, C_l]}."""
    if self.depth not in _STAGES:
      raise ValueError(f"backbone depth must be one of {sorted(_STAGES)}, got {self.depth}")
    blocks = tuple(self.stage_blocks) or _STAGES[self.depth]
    x = conv(self.width_per_group, 7, 2, 3, use_bias=False, dtype=self.dtype, name="conv1")(
        x.astype(self.dtype))
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn1")(x))
    x = mask_to_extent(x, sizes, 1)  # post-ReLU, so zeros act as the pool's -inf padding
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    out = {}
    for stage, n in enumerate(blocks):
      width = self.width_per_group * 2 ** stage
      for i in range(n):
        stride = 2 if (i == 0 and stage > 0) else 1
        level = 2 + stage - (1 if stride == 2 else 0)
        x = Bottleneck(width, stride, self.dtype, name=f"layer{stage + 1}_{i}")(x, sizes, level)
      out[f"c{stage + 2}"] = x
    return out
