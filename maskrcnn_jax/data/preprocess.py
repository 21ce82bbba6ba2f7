"""Numpy-only inference preprocessing that matches torchvision's `GeneralizedRCNNTransform`.

The model side imports this module for inference on single images, so it must stay free of
TensorFlow (and of jax): numpy and the standard library only.

`resized_size` + `resize_bilinear` + `normalize` reproduce, in eval mode,
`GeneralizedRCNNTransform(min_size=800, max_size=1333, ...)`: the image is normalized in float32
((x / 255 - mean) / std), then resized so the short side is `min_size` unless the long side would
exceed `max_size`, with `F.interpolate(mode='bilinear', align_corners=False, antialias=False,
recompute_scale_factor=True)`. (Normalization and bilinear resizing commute up to float rounding;
torchvision normalizes first, and so should callers who want the last ulp.)
"""
import math

import numpy as np

# torchvision's ImageNet statistics, for images in [0, 1] (RGB order).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def resized_size(h, w, min_size=800, max_size=1333):
  """Output size of torchvision's detection resize for an `h` x `w` image.

  torchvision (eager mode) computes `scale = min(min_size / min(h, w), max_size / max(h, w))`
  in Python (float64), and `F.interpolate(..., recompute_scale_factor=True)` takes
  `floor(dim * scale)` for each side.

  Note: TorchScript / ONNX tracing compute the scale in float32 instead, which gives one pixel
  less for some sizes (e.g. 103 x 103 -> 799 x 799 instead of 800 x 800). We follow eager mode,
  which is what `maskrcnn_resnet50_fpn(...)(images)` runs.

  Args:
    h, w: input height and width in pixels (ints).
    min_size: target length of the short side.
    max_size: cap on the long side.

  Returns:
    (new_h, new_w) ints.
  """
  h, w = int(h), int(w)
  scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
  return int(math.floor(h * scale)), int(math.floor(w * scale))


def _linear_indices(in_size, out_size):
  """Source indices and weights of PyTorch's bilinear (align_corners=False) kernel, one axis.

  Mirrors ATen's `area_pixel_compute_scale` / `area_pixel_compute_source_index` /
  `guard_index_and_lambda` in float32: scale = in / out; src = fma(scale, dst + 0.5, -0.5) clamped
  at 0; i0 = min(floor(src), in - 1); i1 = i0 + (i0 < in - 1); lambda = clip(src - i0, 0, 1).

  Returns:
    i0, i1: [out_size] int64; w0, w1: [out_size] float32 weights of i0 and i1.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
  # ATen's compiled kernel fuses `scale * (dst + 0.5) - 0.5` into one FMA (a single rounding). The
  # float64 product of two float32 numbers is exact and so is subtracting 0.5 from it, so rounding
  # once to float32 afterwards reproduces the FMA bit for bit.
  src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
  i1 = i0 + (i0 < in_size - 1).astype(np.int64)
  return i0, i1, np.float32(1.0) - lam, lam


def resize_bilinear(image, new_h, new_w):
  """Bilinear resize equal to `F.interpolate(mode='bilinear', align_corners=False)`.

  The scale used for sampling is recomputed from the integer sizes (in / out), as torchvision's
  `recompute_scale_factor=True` does; no antialiasing.

  Args:
    image: [H, W, C] float32 (any float dtype is cast to float32).
    new_h, new_w: output size in pixels.

  Returns:
    [new_h, new_w, C] float32.
  """
  image = np.asarray(image, dtype=np.float32)
  if image.ndim != 3:
    raise ValueError(f"resize_bilinear expects [H, W, C], got shape {image.shape}")
  h, w, _ = image.shape
  y0, y1, wy0, wy1 = _linear_indices(h, int(new_h))
  x0, x1, wx0, wx1 = _linear_indices(w, int(new_w))
  # Along W first (on the rows we need), then along H, as ATen's separable order does.
  rows = np.unique(np.concatenate([y0, y1]))
  row_pos = np.full(h, -1, dtype=np.int64)
  row_pos[rows] = np.arange(rows.size)
  sub = image[rows]                                   # [R, W, C]
  horiz = sub[:, x0] * wx0[None, :, None] + sub[:, x1] * wx1[None, :, None]  # [R, new_w, C]
  top = horiz[row_pos[y0]]
  bot = horiz[row_pos[y1]]
  out = top * wy0[:, None, None] + bot * wy1[:, None, None]
  return out.astype(np.float32)


def normalize(image):
  """(image / 255 - mean) / std in float32, with torchvision's mean and std.

  Args:
    image: [H, W, 3] uint8 RGB (or any numeric array with values in [0, 255]).

  Returns:
    [H, W, 3] float32.
  """
  x = np.asarray(image).astype(np.float32) / np.float32(255.0)
  mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
  std = np.asarray(IMAGE_STD, dtype=np.float32)
  return (x - mean) / std


def preprocess_for_inference(image, min_size=800, max_size=1333):
  """torchvision-style inference preprocessing of one image (normalize, then resize).

  Args:
    image: [H, W, 3] uint8 RGB.
    min_size, max_size: as in `resized_size`.

  Returns:
    resized: [new_h, new_w, 3] float32, normalized.
    scale: (scale_y, scale_x) floats, new / original, to map boxes back to the original image.
  """
  h, w = image.shape[:2]
  new_h, new_w = resized_size(h, w, min_size, max_size)
  resized = resize_bilinear(normalize(image), new_h, new_w)
  return resized, (new_h / h, new_w / w)
