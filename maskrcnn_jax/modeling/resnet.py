"""ResNet-50/101 as torchvision's `resnet50` under `resnet_fpn_backbone`, norm configurable; and
its last stage as the shared RoI head of C4 models (`ResNetStage`)."""
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


def _check_blocks(stage_blocks: Sequence[int]) -> None:
  if stage_blocks and (len(stage_blocks) != 4 or min(int(b) for b in stage_blocks) < 1):
    raise ValueError(f"backbone.stage_blocks needs four counts >= 1 (layer1..layer4), got "
                     f"{tuple(stage_blocks)}")


# Bottleneck recomputed in the backward pass (`remat`): level, train and axis_name are static.
_RematBottleneck = nn.remat(Bottleneck, static_argnums=(3, 4, 5))


def _stage(x, stage: int, blocks: int, width_per_group: int, norm: str, eps: float, dtype,
           sizes=None, train: bool = False, axis_name: Optional[str] = None,
           remat: bool = False):
  """ResNet stage `stage` (0-based: layer{stage + 1}) of `blocks` bottlenecks, built in the calling
  module's scope (names 'layer{stage + 1}_{i}', as torchvision's 'layer{stage + 1}.{i}'); with
  `remat` each block's activations are recomputed in the backward pass instead of stored."""
  width = width_per_group * 2 ** stage
  block = _RematBottleneck if remat else Bottleneck
  for i in range(blocks):
    stride = 2 if (i == 0 and stage > 0) else 1
    level = 2 + stage - (1 if stride == 2 else 0)
    x = block(width, stride, norm, eps, dtype=dtype, name=f"layer{stage + 1}_{i}")(
        x, sizes, level, train, axis_name)
  return x


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
  num_stages: int = 4
  """Stages computed: 4 (C2..C5, FPN models) or 3 (C2..C4: C4 models, whose fourth stage is the
  RoI head, `ResNetStage`). Set by the builder from `backbone.type`."""
  remat: bool = False
  """Recompute each bottleneck's activations in the backward pass instead of keeping them
  (`flax.linen.remat`): less training memory for ~one more backbone forward. Same variables,
  same values."""

  def __post_init__(self):
    if self.num_stages not in (3, 4):
      raise ValueError(f"ResNet.num_stages must be 3 or 4, got {self.num_stages}")
    if self.depth not in _STAGES:
      raise ValueError(f"backbone depth must be one of {sorted(_STAGES)}, got {self.depth}")
    _check_blocks(self.stage_blocks)
    check_norm(self.norm, "backbone.norm", [self.width_per_group * 2 ** s for s in range(4)])
    super().__post_init__()

  @property
  def out_channels(self) -> Dict[str, int]:
    """Channels of C2..C5 (C2..C4 with three stages)."""
    return {f"c{s + 2}": self.width_per_group * 2 ** s * 4 for s in range(self.num_stages)}

  @nn.compact
  def __call__(self, x, sizes=None, train: bool = False,
               axis_name: Optional[str] = None) -> Dict[str, jnp.ndarray]:
    """x: [B, H, W, 3] normalized image; sizes: [B, 2] int32 padded image sizes (see
    `mask_to_extent`) or None. Returns {'c2'..'c5': [B, H/2**l, W/2**l, C_l]} ('c2'..'c4' with
    three stages)."""
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
    for stage, n in enumerate(blocks[:self.num_stages]):
      x = _stage(x, stage, n, self.width_per_group,
                 frozen(self.norm, stage + 1 <= self.frozen_stages), self.norm_eps, self.dtype,
                 sizes, train, axis_name, self.remat)
      out[f"c{stage + 2}"] = x
    return out


class ResNetStage(nn.Module):
  """ResNet's fourth stage (layer4, res5) as the RoI head shared by the box and mask heads of a C4
  model, as Detectron2's `Res5ROIHeads`: pooled [N, S, S, C4 channels] -> [N, ceil(S/2),
  ceil(S/2), 8 * 4 * width_per_group] (stride 2 in its first block). Its variables sit under the
  model's `roi_trunk`, named as the backbone's ('layer4_0', ...), so an ImageNet ResNet's `layer4`
  loads into it.

  Its norm sees RoIs, not images: batch statistics over a padded RoI batch would be wrong, so
  'bn' is refused (use bn_frozen_stats, frozen_bn, gn or none). Its parameters are frozen with
  `training.frozen_stages=4`, as layer4's.
  """
  depth: int = 50
  """ResNet depth (selects the stage's blocks unless `stage_blocks` is given)."""
  width_per_group: int = 64
  """The first stage's bottleneck width (this stage's is 8x)."""
  stage_blocks: Sequence[int] = ()
  """Blocks per stage of the whole ResNet (four counts; this stage uses the last)."""
  norm: str = "frozen_bn"
  """One of `layers.NORM_TYPES` except 'bn'."""
  norm_eps: float = 1e-5
  """The norm's epsilon."""
  dtype: Any = jnp.float32
  """Compute dtype."""

  def __post_init__(self):
    if self.norm == "bn":
      raise ValueError("backbone.norm='bn' cannot normalize a C4 model's RoI head (res5) by batch "
                       "statistics over padded RoIs; use bn_frozen_stats, frozen_bn, gn or none")
    _check_blocks(self.stage_blocks)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False, axis_name: Optional[str] = None):
    """x: [..., S, S, C4] pooled RoI features -> [..., ceil(S/2), ceil(S/2), 32 * width]."""
    blocks = tuple(self.stage_blocks) or _STAGES[self.depth]
    lead = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:]).astype(self.dtype)
    x = _stage(x, 3, blocks[3], self.width_per_group, self.norm, self.norm_eps, self.dtype, None,
               train, axis_name)
    return x.reshape(lead + x.shape[1:])
