"""Feature pyramid on C2..C5 plus P6 by max-pool, as torchvision's `FeaturePyramidNetwork` with
`LastLevelMaxPool`."""
from typing import Any, Dict, List

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import conv, mask_to_extent, nearest_upsample_to


class FPN(nn.Module):
  """Returns [P2, P3, P4, P5, P6], each [B, H_l, W_l, channels]."""
  channels: int = 256
  """Output channels of every pyramid level."""
  dtype: Any = jnp.float32
  """Compute dtype."""

  @nn.compact
  def __call__(self, feats: Dict[str, jnp.ndarray], sizes=None) -> List[jnp.ndarray]:
    """feats: {'c2'..'c5'}; sizes: [B, 2] padded image sizes or None (see `mask_to_extent`)."""
    names = ["c2", "c3", "c4", "c5"]
    inner = [conv(self.channels, 1, dtype=self.dtype, name=f"inner_blocks_{i}") for i in range(4)]
    layer = [conv(self.channels, 3, 1, 1, dtype=self.dtype, name=f"layer_blocks_{i}")
             for i in range(4)]
    last = inner[3](feats["c5"])
    results = [layer[3](mask_to_extent(last, sizes, 5))]
    for i in (2, 1, 0):
      lateral = inner[i](feats[names[i]])
      last = lateral + nearest_upsample_to(last, lateral.shape[1:3])
      results.insert(0, layer[i](mask_to_extent(last, sizes, i + 2)))
    results.append(results[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2)
    return results
