"""RoI poolers: one per RoI head (`box_pooler`, `mask_pooler`, ...), each its own config section."""
import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.anchors import feature_grid_size
from maskrcnn_jax.ops.roi_align import multilevel_roi_align_batched
from maskrcnn_jax.types import Array

POOLER_TYPES = ("align",)


@dataclasses.dataclass(frozen=True)
class RoIPooler:
  """Pools each box from one feature level, as torchvision's `MultiScaleRoIAlign` (no parameters).

  A box is assigned to a level by eq. 1 of the FPN paper (`canonical_scale`, `canonical_level`),
  clamped to `levels`; with a single level every box reads it.
  """
  type: str = "align"
  """'align': RoIAlign (bilinear samples averaged per bin)."""
  output_size: int = 7
  """Pooled size S (7 for box heads, 14 for mask heads)."""
  sampling_ratio: int = 2
  """Bilinear samples per bin side (>= 1: static shapes)."""
  aligned: bool = False
  """Half-pixel offset (torchvision's Mask R-CNN uses False, Detectron2 True)."""
  canonical_scale: int = 224
  """Level mapping: a box of this sqrt(area) goes to `canonical_level`."""
  canonical_level: int = 4
  """Level mapping: the level of a canonical box."""
  levels: Sequence[int] = (2, 3, 4, 5)
  """Feature levels (log2 of the stride) pooled from, consecutive."""

  def __post_init__(self):
    if self.type not in POOLER_TYPES:
      raise ValueError(f"pooler type must be one of {POOLER_TYPES}, got {self.type!r}")
    levels = tuple(int(l) for l in self.levels)
    if not levels or levels != tuple(range(levels[0], levels[0] + len(levels))):
      raise ValueError(f"pooler levels must be consecutive, e.g. (2, 3, 4, 5); got {self.levels}")
    if int(self.output_size) < 1:
      raise ValueError(f"pooler output_size must be >= 1, got {self.output_size}")
    if not isinstance(self.sampling_ratio, int) or self.sampling_ratio < 1:
      raise ValueError(f"pooler sampling_ratio must be an int >= 1, got {self.sampling_ratio!r}")
    object.__setattr__(self, "levels", levels)

  def __call__(self, features: Mapping[int, Array], boxes: Array,
               padded_sizes: Optional[Array] = None) -> Array:
    """Pools RoI features.

    Args:
      features: {level: [B, H_l, W_l, C]} with every level of `levels` (others are ignored).
      boxes: [B, N, 4] (x1, y1, x2, y2) canvas pixels (no gradient flows into them).
      padded_sizes: [B, 2] int32 sizes each image is padded to (see `layers.mask_to_extent`), or
        None: the maps' borders are the canvas'.

    Returns:
      [B, N, S, S, C] in the features' dtype.
    """
    missing = [l for l in self.levels if l not in features]
    if missing:
      raise ValueError(f"the pooler reads levels {self.levels}; the backbone gives "
                       f"{sorted(features)}")
    maps = [features[l] for l in self.levels]
    extents = None
    if padded_sizes is not None:
      extents = jnp.stack([feature_grid_size(padded_sizes.astype(jnp.int32), l)
                           for l in self.levels], axis=1)  # [B, L, 2]
    return multilevel_roi_align_batched(
        maps, jax.lax.stop_gradient(boxes), self.output_size, [2.0 ** -l for l in self.levels],
        sampling_ratio=self.sampling_ratio, aligned=self.aligned,
        canonical_scale=self.canonical_scale, canonical_level=self.canonical_level,
        extents=extents)
