"""Feature pyramid on C2..C5 plus P6 by max-pool, as torchvision's `FeaturePyramidNetwork` with
`LastLevelMaxPool` (v2: convs without bias followed by a norm)."""
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import Norm, check_norm, conv, mask_to_extent, nearest_upsample_to


class FPN(nn.Module):
  """Returns [P2, P3, P4, P5, P6], each [B, H_l, W_l, channels]."""
  channels: int = 256
  """Output channels of every pyramid level."""
  norm: str = "none"
  """Norm after each conv (`layers.NORM_TYPES`): 'none' in torchvision v1, 'bn' in v2."""
  dtype: Any = jnp.float32
  """Compute dtype."""

  def __post_init__(self):
    check_norm(self.norm, "fpn.norm", [self.channels])
    super().__post_init__()

  @nn.compact
  def __call__(self, feats: Dict[str, jnp.ndarray], sizes=None, train: bool = False,
               axis_name: Optional[str] = None) -> List[jnp.ndarray]:
    """feats: {'c2'..'c5'}; sizes: [B, 2] padded image sizes or None (see `mask_to_extent`)."""
    names = ["c2", "c3", "c4", "c5"]
    bias = self.norm == "none"

    def block(kind, i, kernel, x):
      y = conv(self.channels, kernel, 1, kernel // 2, use_bias=bias, dtype=self.dtype,
               name=f"{kind}_{i}")(x)
      return Norm(self.norm, dtype=self.dtype, name=f"{kind}_norm_{i}")(y, train, axis_name)

    last = block("inner_blocks", 3, 1, feats["c5"])
    results = [block("layer_blocks", 3, 3, mask_to_extent(last, sizes, 5))]
    for i in (2, 1, 0):
      lateral = block("inner_blocks", i, 1, feats[names[i]])
      last = lateral + nearest_upsample_to(last, lateral.shape[1:3])
      results.insert(0, block("layer_blocks", i, 3, mask_to_extent(last, sizes, i + 2)))
    results.append(results[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2)
    return results
