"""Jitted, bucketed inference on lists of images of any sizes.

Images are normalized and resized on the host exactly as torchvision's transform does
(`data.preprocess`), padded to a canvas from a small set of shapes (multiples of `bucket` on
accelerators; on CPU, by default, multiples of 32 as torchvision pads), and run through one jitted
`detect` per (canvas, batch size), so a new image size within a bucket never recompiles, then the
RoI heads on a power-of-two bucket of detection slots holding the valid detections. Results come
back in each image's original pixel frame.
"""
import collections
import functools
import math
from typing import Any, Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.data.preprocess import normalize, resize_bilinear, resized_size
from maskrcnn_jax.ops.masks import paste_masks

# Python-side trace counters: incremented only while jax traces, so they count compilations.
TRACE_COUNTS: collections.Counter = collections.Counter()
_PASTE_CHUNK = 16
# Whether `run_batches` sends batch i + 1 before reading batch i; None: on accelerators only.
DISPATCH_AHEAD = None


def _round_up(x: int, m: int) -> int:
  return int(math.ceil(x / m) * m)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, images, image_sizes, padded_sizes):
  TRACE_COUNTS["forward"] += 1
  return model.apply(variables, images, image_sizes, padded_sizes)


@functools.partial(jax.jit, static_argnums=0)
def _detect(model, variables, images, image_sizes, padded_sizes):
  TRACE_COUNTS["forward"] += 1
  return model.apply(variables, images, image_sizes, padded_sizes, method=model.detect)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _heads(model, variables, pyramid, padded_sizes, dets, slots):
  TRACE_COUNTS["heads"] += 1
  first = {k: v[:, :slots] for k, v in dets.items() if k in _DETECTION_KEYS}
  out = model.apply(variables, pyramid, padded_sizes, first, method=model.predict_heads)
  return {**dets, **out}


# Entries of `MaskRCNN.detect`'s detections with one slot per detection ([B, D, ...]).
_DETECTION_KEYS = ("boxes", "scores", "labels", "valid")


def head_slots(valid: np.ndarray) -> int:
  """Detection slots the RoI heads run on: the smallest power of two (or D) holding every
  image's valid detections, when those come first (as `detect` returns them); else all D.

  Args:
    valid: [B, D] bool.
  """
  d = valid.shape[1]
  count = int(valid.sum(axis=1).max(initial=0))
  if not np.array_equal(valid, np.arange(d)[None, :] < valid.sum(axis=1, keepdims=True)):
    return d
  slots = 1
  while slots < count:
    slots *= 2
  return min(slots, d)


def _two_stage_forward(model, variables, batch, sizes, padded):
  """`model.apply` as `detect` (dispatched now) and the RoI heads on `head_slots` detection slots
  (run when the returned function is called: it reads the valid flags back first)."""
  sizes, padded = jnp.asarray(sizes), jnp.asarray(padded)
  pyramid, dets = _detect(model, variables, jnp.asarray(batch), sizes, padded)
  if not model.roi_heads:
    return dets

  def heads():
    slots = head_slots(np.asarray(dets["valid"]))
    return _heads(model, variables, pyramid, padded, dets, slots)

  return heads


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _paste(masks, boxes, height, width, threshold=None):
  TRACE_COUNTS["paste"] += 1
  pasted = paste_masks(masks, boxes, height, width)
  return pasted if threshold is None else pasted > threshold


def _check_images(images) -> None:
  if isinstance(images, np.ndarray) or not isinstance(images, Sequence):
    raise TypeError("images must be a list of [H, W, 3] uint8 arrays "
                    f"(got {type(images).__name__}; wrap a single image in a list)")
  if len(images) == 0:
    raise ValueError("images is empty: pass at least one [H, W, 3] uint8 image")
  for i, im in enumerate(images):
    if not isinstance(im, np.ndarray):
      raise TypeError(f"images[{i}] is a {type(im).__name__}, expected a numpy array")
    if im.dtype != np.uint8:
      raise TypeError(f"images[{i}] has dtype {im.dtype}; expected uint8 RGB in [0, 255]")
    if im.ndim != 3 or im.shape[2] != 3:
      raise ValueError(f"images[{i}] has shape {im.shape}; expected [H, W, 3] RGB")
    if im.shape[0] < 1 or im.shape[1] < 1:
      raise ValueError(f"images[{i}] is empty: shape {im.shape}")


def predict(model, variables, images: List[np.ndarray], exact_padding: bool = None,
            min_size: int = 800, max_size: int = 1333, bucket: int = 128,
            batch_size: int = 1, mask_threshold: float = None) -> List[Dict[str, np.ndarray]]:
  """Detects (and segments) objects in images of any sizes.

  Args:
    model: a `MaskRCNN` (e.g. from `convert.from_torchvision` or `build_model`).
    variables: its {'params', 'batch_stats'}.
    images: list of [H, W, 3] uint8 RGB arrays, any sizes.
    exact_padding: True: pad each image to the next multiple of 32 as torchvision does (one
      compile per distinct padded shape); False: pad to multiples of `bucket` (fewer compiles),
      with anchors laid out as for the multiple-of-32 padding, so results stay close to
      torchvision's. None (default): exact on CPU, where the bucket's extra pixels cost more than
      its saved compiles (R50-FPN at 800 px: 3.8 s vs 4.2 s per image, benchmarks/RESULTS.md),
      buckets on accelerators.
    min_size, max_size: torchvision's resize (short side to min_size, long side at most max_size).
    bucket: canvas sides are multiples of this (a multiple of 32).
    batch_size: images per jitted call (a short last batch is padded).
    mask_threshold: if given, masks are returned as bool `prob > mask_threshold`.

  Returns:
    Per image a dict: boxes [N, 4] float32 (x1, y1, x2, y2) original pixels, scores [N] float32
    (descending), labels [N] int64, and masks [N, H, W] float32 probabilities in the original frame
    (when the model has a mask head); keypoints [N, K, 3] (x, y, 1) original pixels and
    keypoints_scores [N, K] (with a keypoint head); other heads' `prediction_keys` as [N, ...]
    arrays.
  """
  _check_images(images)
  if bucket % 32:
    raise ValueError(f"bucket must be a multiple of 32, got {bucket}")
  if exact_padding is None:
    exact_padding = jax.default_backend() == "cpu"
  prepared = prepare_images(images, min_size, max_size)
  for p in prepared:
    h, w = p["size"]
    p["canvas"] = p["padded"] if exact_padding else (_round_up(h, bucket), _round_up(w, bucket))

  def forward(batch, sizes, padded):
    return _two_stage_forward(model, variables, batch, sizes, padded)

  return run_batches(prepared, forward, batch_size, bucket, mask_threshold, model.point_keys)


def prepare_images(images: Sequence[np.ndarray], min_size: int, max_size: int) -> List[Dict]:
  """Host preprocessing of `predict` (torchvision's eval transform, `data.preprocess`).

  Args:
    images: checked [H, W, 3] uint8 RGB arrays.

  Returns:
    Per image a dict: orig (H, W), size (h, w) after the resize, padded (h, w) rounded up to
    multiples of 32 (the anchors' frame), pixels [h, w, 3] float32 normalized; the caller adds
    canvas (the padded batch's (H, W), at least `padded`).
  """
  prepared = []
  for im in images:
    h0, w0 = im.shape[:2]
    h, w = resized_size(h0, w0, min_size, max_size)
    prepared.append(dict(orig=(h0, w0), size=(h, w), padded=(_round_up(h, 32), _round_up(w, 32)),
                         pixels=resize_bilinear(normalize(im), h, w)))
  return prepared


def run_batches(prepared: List[Dict], forward: Callable, batch_size: int, bucket: int,
                mask_threshold, point_keys: Sequence[str]) -> List[Dict[str, np.ndarray]]:
  """Runs `forward` on batches of images of one canvas and returns their detections in the
  original frames (see `predict`).

  On accelerators batches are dispatched one ahead: batch i + 1 is sent to the device before batch
  i's results are read back and post-processed on the host, so the host work overlaps the next
  forward. On CPU the device is the host's own cores, which the two would share: there each batch
  is finished before the next is sent (`DISPATCH_AHEAD` overrides: True / False).

  Args:
    prepared: `prepare_images` dicts with their canvas.
    forward: (images [b, H, W, 3] float32, image_sizes [b, 2] int32, padded_sizes [b, 2] int32)
      -> the model's detection dict of device arrays [b, ...] (canvas pixels), or a function
      returning it (called when the batch's results are read).
    batch_size: b, images per call (a short last batch is padded with blank images).
    bucket, mask_threshold: as in `predict`.
    point_keys: detection entries holding (x, y, ...) points in canvas pixels.
  """
  groups: Dict[Any, List[int]] = collections.defaultdict(list)
  for i, p in enumerate(prepared):
    groups[p["canvas"]].append(i)
  results: List[Dict[str, np.ndarray]] = [None] * len(prepared)
  pending = None
  ahead = DISPATCH_AHEAD if DISPATCH_AHEAD is not None else jax.default_backend() != "cpu"

  def finish(chunk, out):
    out = jax.device_get(out() if callable(out) else out)
    for j, i in enumerate(chunk):
      results[i] = _to_original_frame({k: v[j] for k, v in out.items()}, prepared[i],
                                      bucket, mask_threshold, point_keys)

  for canvas, idxs in groups.items():
    for start in range(0, len(idxs), batch_size):
      chunk = idxs[start:start + batch_size]
      batch = np.zeros((batch_size,) + tuple(canvas) + (3,), np.float32)
      sizes = np.tile(np.asarray(canvas, np.int32), (batch_size, 1))
      padded = sizes.copy()
      for j, i in enumerate(chunk):
        p = prepared[i]
        batch[j, :p["size"][0], :p["size"][1]] = p["pixels"]
        sizes[j], padded[j] = p["size"], p["padded"]
      out = forward(batch, sizes, padded)  # dispatched, not waited for
      if pending is not None:
        finish(*pending)
      pending = (chunk, out)
      if not ahead:
        finish(*pending)
        pending = None
  if pending is not None:
    finish(*pending)
  return results


# Detection entries converted (or dropped: proposals) by `_to_original_frame`.
_CONVERTED = ("valid", "boxes", "scores", "labels", "masks", "proposals", "proposal_valid")


def _to_original_frame(det: Dict[str, np.ndarray], p: Dict[str, Any], bucket: int,
                       mask_threshold, point_keys: Sequence[str] = ()) -> Dict[str, np.ndarray]:
  valid = det["valid"]
  (h0, w0), (h, w) = p["orig"], p["size"]
  # torchvision's resize_boxes: ratios new/old computed in float32.
  ratio_h = np.float32(h0) / np.float32(h)
  ratio_w = np.float32(w0) / np.float32(w)
  boxes = det["boxes"][valid].astype(np.float32) * np.array(
      [ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
  res = dict(boxes=boxes, scores=det["scores"][valid].astype(np.float32),
             labels=det["labels"][valid].astype(np.int64))
  if "masks" in det:
    small = det["masks"][valid]
    n = small.shape[0]
    ch, cw = _round_up(h0, bucket), _round_up(w0, bucket)
    threshold = None if mask_threshold is None else float(mask_threshold)
    # Thresholded on the device: a bool comes back instead of a float32 per pixel.
    full = np.zeros((n, h0, w0), np.float32 if threshold is None else bool)
    for s in range(0, n, _PASTE_CHUNK):
      m = np.zeros((_PASTE_CHUNK,) + small.shape[1:], np.float32)
      b = np.zeros((_PASTE_CHUNK, 4), np.float32)
      k = min(_PASTE_CHUNK, n - s)
      m[:k], b[:k] = small[s:s + k], boxes[s:s + k]
      full[s:s + k] = np.asarray(_paste(m, b, ch, cw, threshold)[:k, :h0, :w0])
    res["masks"] = full
  # Points ([D, P, 2 + n], x and y in canvas pixels; torchvision's resize_keypoints) scale as
  # boxes; other heads' per-detection predictions ([D, ...], no image coordinates) pass through.
  for k in point_keys:
    pts = det[k][valid].astype(np.float32).copy()
    pts[..., 0] *= ratio_w
    pts[..., 1] *= ratio_h
    res[k] = pts
  for k, v in det.items():
    if k not in _CONVERTED and k not in point_keys:
      res[k] = v[valid]
  return res
