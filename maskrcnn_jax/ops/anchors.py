"""Anchor grids identical to torchvision's `AnchorGenerator`.

Anchors are ordered level by level, then row-major over the feature grid (y, then x), then over the
cell anchors of a location, which is the order of an NHWC head output reshaped to [H * W * A, ...].
"""
from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.types import Array


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """Zero-centred anchors of one level, rounded as torchvision rounds them.

  Args:
    sizes: anchor sizes (sqrt of area) of the level, e.g. (32,).
    aspect_ratios: height / width ratios, e.g. (0.5, 1.0, 2.0).

  Returns:
    [len(aspect_ratios) * len(sizes), 4] float32 (x1, y1, x2, y2), ratio-major like torchvision.
  """
  scales = np.asarray(sizes, np.float32)
  ratios = np.asarray(aspect_ratios, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
  return np.round(base).astype(np.float32)  # round-half-even, as torch.round


def feature_grid_size(size: Array, level: int) -> Array:
  """Side of the level-`level` feature map (stride 2**level) for an input side `size`.

  Every stride-2 layer of ResNet-FPN (padded 7x7 / 3x3 convs, max pools, P6's 1x1 pool) maps n to
  ceil(n / 2). Works on ints and traced int arrays.
  """
  for _ in range(level):
    size = (size + 1) // 2
  return size


def grid_anchors(grid_shape: Tuple[int, int], stride: Tuple[Array, Array],
                 cell: np.ndarray) -> Array:
  """Anchors of one level, as `AnchorGenerator.grid_anchors`.

  Args:
    grid_shape: static (grid_h, grid_w) of the feature map.
    stride: (stride_h, stride_w) ints, possibly traced; torchvision uses
      `padded_image_size // grid_size` (so e.g. 61, not 64, on P6 of an 800-pixel side).
    cell: [A, 4] float32 from `cell_anchors`.

  Returns:
    [grid_h * grid_w * A, 4] float32 (x1, y1, x2, y2) pixels.
  """
  gh, gw = grid_shape
  shift_y = jnp.arange(gh, dtype=jnp.int32) * jnp.asarray(stride[0], jnp.int32)
  shift_x = jnp.arange(gw, dtype=jnp.int32) * jnp.asarray(stride[1], jnp.int32)
  sy, sx = jnp.meshgrid(shift_y, shift_x, indexing="ij")
  sx = sx.reshape(-1).astype(jnp.float32)
  sy = sy.reshape(-1).astype(jnp.float32)
  shifts = jnp.stack([sx, sy, sx, sy], axis=1)
  return (shifts[:, None, :] + jnp.asarray(cell)[None, :, :]).reshape(-1, 4)


def multilevel_anchors(grid_shapes: Sequence[Tuple[int, int]], levels: Sequence[int],
                       image_shape: Tuple[Array, Array],
                       cells: Sequence[np.ndarray]) -> Tuple[Array, Array]:
  """Anchors of all levels for one padded image size, plus which of them exist for that size.

  The grids are static (`grid_shapes`, what the network computed on its canvas), but `image_shape`
  may be smaller than the canvas and traced. Anchors are laid out as torchvision lays them out for
  an image padded to `image_shape` (stride `image_shape // grid` per level), and anchors on grid
  cells beyond that image's own grid are marked invalid. With `image_shape` equal to the canvas
  every anchor is valid and the result is exactly torchvision's.

  Args:
    grid_shapes: static [(grid_h, grid_w)] per level, finest first.
    levels: the pyramid level of each grid (stride 2**level), e.g. (2, 3, 4, 5, 6).
    image_shape: (padded_h, padded_w) ints, possibly traced.
    cells: per-level [A, 4] cell anchors.

  Returns:
    anchors: [sum(grid_h * grid_w * A), 4] float32 (x1, y1, x2, y2) pixels.
    valid: [sum(grid_h * grid_w * A)] bool.
  """
  anchors, valid = [], []
  ph = jnp.asarray(image_shape[0], jnp.int32)
  pw = jnp.asarray(image_shape[1], jnp.int32)
  for (gh, gw), level, cell in zip(grid_shapes, levels, cells):
    eh, ew = feature_grid_size(ph, level), feature_grid_size(pw, level)
    anchors.append(grid_anchors((gh, gw), (ph // eh, pw // ew), cell))
    yy, xx = jnp.meshgrid(jnp.arange(gh), jnp.arange(gw), indexing="ij")
    cell_ok = (yy < eh) & (xx < ew)
    valid.append(jnp.repeat(cell_ok.reshape(-1), cell.shape[0]))
  return jnp.concatenate(anchors, 0), jnp.concatenate(valid, 0)
