"""ResNet-50/101 as torchvision's `resnet50` under `resnet_fpn_backbone`, norm configurable."""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import Norm, check_norm, conv, frozen, mask_to_extent

_STAGES = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: the stride sits in the 3x3 conv)."""
  width: int
  stride: int
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, sizes=None, level: int = 2, train: bool = False,
               axis_name: Optional[str] = None):
    """x: [B, H, W, C] at stride 2**level; sizes: [B, 2] padded image sizes or None."""
    out_ch = self.width * 4
    bias = self.norm == "none"

    def norm(name, y):
      return Norm(self.norm, self.norm_eps, dtype=self.dtype, name=name)(y, train, axis_name)
    y = conv(self.width, 1, use_bias=bias, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(norm("bn1", y))
    y = mask_to_extent(y, sizes, level)
    y = conv(self.width, 3, self.stride, 1, use_bias=bias, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(norm("bn2", y))
    y = conv(out_ch, 1, use_bias=bias, dtype=self.dtype, name="conv3")(y)
    y = norm("bn3", y)
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = conv(out_ch, 1, self.stride, use_bias=bias, dtype=self.dtype, name="downsample_conv")(x)
      x = norm("downsample_bn", x)
    return nn.relu(y + x.astype(y.dtype))


class ResNet(nn.Module):
  """ResNet body returning C2..C5 (strides 4, 8, 16, 32) as a dict {'c2': ..., 'c5': ...}."""
  depth: int = 50
  """50 or 101 (152 also works); selects the number of bottlenecks per stage."""
  width_per_group: int = 64
  """Bottleneck width of the first stage; 8 or 16 give the tiny test backbones."""
  stage_blocks: Sequence[int] = ()
  """Overrides the blocks per stage (e.g. (1, 1, 1, 1) for tests); empty means the depth's."""
  norm: str = "frozen_bn"
  """One of `layers.NORM_TYPES`: 'frozen_bn' (torchvision v1), 'bn' (v2, trained with batch
  statistics), 'bn_frozen_stats', 'gn' or 'none'."""
  norm_eps: float = 1e-5
  """The norm's epsilon. state_dicts do not hold it: torchvision's constructors use 1e-5, its
  published v1 COCO weights were evaluated with 0."""
  frozen_stages: int = 0
  """The stem and layer1..layer{k} whose BatchNorm keeps its running statistics in training (set
  from training.frozen_stages by the builder; their parameters are frozen by the optimizer)."""
  dtype: Any = jnp.float32
  """Compute dtype (bfloat16 for mixed precision); parameters stay float32."""

  def __post_init__(self):
    if self.depth not in _STAGES:
      raise ValueError(f"backbone depth must be one of {sorted(_STAGES)}, got {self.depth}")
    check_norm(self.norm, "backbone.norm", [self.width_per_group * 2 ** s for s in range(4)])
    super().__post_init__()

  @property
  def out_channels(self) -> Dict[str, int]:
    """Channels of C2..C5."""
    return {f"c{s + 2}": self.width_per_group * 2 ** s * 4 for s in range(4)}

  @nn.compact
  def __call__(self, x, sizes=None, train: bool = False,
               axis_name: Optional[str] = None) -> Dict[str, jnp.ndarray]:
    """x: [B, H, W, 3] normalized image; sizes: [B, 2] int32 padded image sizes (see
    `mask_to_extent`) or None. Returns {'c2'..'c5': [B, H/2**l, W/2**l, C_l]}."""
    blocks = tuple(self.stage_blocks) or _STAGES[self.depth]
    bias = self.norm == "none"
    x = conv(self.width_per_group, 7, 2, 3, use_bias=bias, dtype=self.dtype, name="conv1")(
        x.astype(self.dtype))
    x = Norm(frozen(self.norm, self.frozen_stages >= 1), self.norm_eps, dtype=self.dtype,
             name="bn1")(x, train, axis_name)
    x = nn.relu(x)
    x = mask_to_extent(x, sizes, 1)  # post-ReLU, so zeros act as the pool's -inf padding
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    out = {}
    for stage, n in enumerate(blocks):
      width = self.width_per_group * 2 ** stage
      for i in range(n):
        stride = 2 if (i == 0 and stage > 0) else 1
        level = 2 + stage - (1 if stride == 2 else 0)
        x = Bottleneck(width, stride, frozen(self.norm, stage + 1 <= self.frozen_stages),
                       self.norm_eps, dtype=self.dtype, name=f"layer{stage + 1}_{i}")(
                           x, sizes, level, train, axis_name)
      out[f"c{stage + 2}"] = x
    return out
