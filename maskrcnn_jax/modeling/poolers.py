"""RoI poolers: one per RoI head (`box_pooler`, `mask_pooler`, ...), each its own config section."""
import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.anchors import feature_grid_size
from maskrcnn_jax.ops.roi_align import (
    MAX_SAMPLES,
    REDUCES,
    multilevel_roi_align_batched,
    multilevel_roi_warp_batched,
)
from maskrcnn_jax.ops.roi_pool import multilevel_roi_pool_batched
from maskrcnn_jax.types import Array

POOLER_TYPES = ("align", "pool", "warp")
# Each type's reduce when `reduce` is left empty; RoIPool has only its maximum.
_NATURAL_REDUCE = {"align": "ave", "pool": "max", "warp": "ave"}


@dataclasses.dataclass(frozen=True)
class RoIPooler:
  """Pools each box from one feature level, as torchvision's `MultiScaleRoIAlign` (no parameters).

  A box is assigned to a level by eq. 1 of the FPN paper (`canonical_scale`, `canonical_level`),
  clamped to `levels`; with a single level every box reads it. The type and reduce switch among the
  RoI layers of the Mask R-CNN paper's Table 2c (`ops.roi_align`, `ops.roi_warp`, `ops.roi_pool`).
  """
  type: str = "align"
  """'align': RoIAlign; 'warp': RoIWarp (RoIPool's snapped box, sampled bilinearly); 'pool': RoIPool
  (snapped box, maximum over whole-pixel bins)."""
  output_size: int = 7
  """Pooled size S (7 for box heads, 14 for mask heads)."""
  sampling_ratio: int = 2
  """Bilinear samples per bin side ('align', 'warp'); 0: adaptive, ceil(box side / S) per box as
  torchvision's default, at most `max_samples`."""
  aligned: bool = False
  """Half-pixel offset (torchvision's Mask R-CNN uses False, Detectron2 True); 'align' only."""
  canonical_scale: int = 224
  """Level mapping: a box of this sqrt(area) goes to `canonical_level`."""
  canonical_level: int = 4
  """Level mapping: the level of a canonical box."""
  levels: Sequence[int] = (2, 3, 4, 5)
  """Feature levels (log2 of the stride) pooled from, consecutive."""
  reduce: str = ""
  """'ave' or 'max' over a bin's samples ('align', 'warp'); '' takes the type's own: 'ave' for
  align and warp, 'max' for pool (RoIPool has only 'max'; 'ave' with it is an error)."""
  max_samples: int = MAX_SAMPLES
  """Cap on adaptive samples per bin side (`sampling_ratio=0`); the cost grows with its square."""
  max_bin_size: int = 8
  """'pool': pixels a bin reads exactly per side, larger bins are subsampled (at S = 7, 8 covers
  FPN-mapped boxes of aspect ratio up to ~2.8, and P5 boxes up to ~1500 px); 0: enough for every
  box inside its map (slow on fine maps)."""

  def __post_init__(self):
    if self.type not in POOLER_TYPES:
      raise ValueError(f"pooler type must be one of {POOLER_TYPES}, got {self.type!r}")
    levels = tuple(int(l) for l in self.levels)
    if not levels or levels != tuple(range(levels[0], levels[0] + len(levels))):
      raise ValueError(f"pooler levels must be consecutive, e.g. (2, 3, 4, 5); got {self.levels}")
    if int(self.output_size) < 1:
      raise ValueError(f"pooler output_size must be >= 1, got {self.output_size}")
    if (isinstance(self.sampling_ratio, bool) or not isinstance(self.sampling_ratio, int)
        or self.sampling_ratio < 0):
      raise ValueError("pooler sampling_ratio must be an int >= 1, or 0 for adaptive sampling; "
                       f"got {self.sampling_ratio!r}")
    if self.reduce not in ("",) + REDUCES:
      raise ValueError(f"pooler reduce must be one of {REDUCES} or '' (the type's own), got "
                       f"{self.reduce!r}")
    if self.type == "pool" and self.reduce == "ave":
      raise ValueError("pooler reduce='ave' is not defined for type 'pool' (RoIPool takes the "
                       "maximum); use reduce='max' or '', or type 'align' / 'warp'")
    if self.aligned and self.type != "align":
      raise ValueError(f"pooler aligned=True applies to type 'align' only, got type {self.type!r}")
    if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or (
        self.max_samples < 1):
      raise ValueError(f"pooler max_samples must be an int >= 1, got {self.max_samples!r}")
    if isinstance(self.max_bin_size, bool) or not isinstance(self.max_bin_size, int) or (
        self.max_bin_size < 0):
      raise ValueError(f"pooler max_bin_size must be an int >= 1, or 0 (the maps' size); got "
                       f"{self.max_bin_size!r}")
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
    boxes = jax.lax.stop_gradient(boxes)
    scales = [2.0 ** -l for l in self.levels]
    levels = dict(canonical_scale=self.canonical_scale, canonical_level=self.canonical_level,
                  extents=extents)
    reduce = self.reduce or _NATURAL_REDUCE[self.type]
    if self.type == "pool":
      return multilevel_roi_pool_batched(maps, boxes, self.output_size, scales, **levels,
                                         max_bin_size=self.max_bin_size or None)
    if self.type == "warp":
      return multilevel_roi_warp_batched(maps, boxes, self.output_size, scales,
                                         self.sampling_ratio, reduce=reduce,
                                         max_samples=self.max_samples, **levels)
    return multilevel_roi_align_batched(
        maps, boxes, self.output_size, scales, sampling_ratio=self.sampling_ratio,
        aligned=self.aligned, reduce=reduce, max_samples=self.max_samples, **levels)
