"""Transforms: small `features -> features` functions, chained in a list by `compose`.

Each transform is made by a factory (`resize_to_fit(...)`, `random_flip(...)`) and maps a dict of
tensors for ONE example to a new dict. They are plain TensorFlow, so they give the same result
called eagerly and inside `tf.data` (tests check both). Random transforms are stateless: they draw
from `features['seed']` ([2] int, set per example by the pipeline) folded with a per-transform salt,
so a pipeline seed fixes every random choice.

Per-example features, in the order the default chain produces them:

  image          [H, W, 3] uint8 after `decode_coco_example`, float32 after resizing, normalized by
                 `normalize`, padded to a fixed [Hp, Wp, 3] by `pad_image`
  image_id       [] int64 COCO image id
  original_size  [2] int32 (height, width) of the stored image
  image_size     [2] int32 (height, width) of the current image before padding
  scale          [2] float32 (scale_y, scale_x): current size / original size (for eval: divide
                 predicted boxes by it to get original-image pixels)
  gt_boxes       [M, 4] float32 (x1, y1, x2, y2) pixels of the current image, non-crowd objects
  gt_classes     [M] int32 contiguous class 1..K (0 is background)
  gt_masks       [M, S, S] float32 in [0, 1]: each object's mask cut to its box and resampled to
                 S x S (see `crop_and_resize`); uint8 {0, 1} after `binarize_masks`
  crowd_boxes    [Mc, 4] float32 (x1, y1, x2, y2) pixels, crowd objects
  gt_keypoints   [M, K, 3] float32 (x, y, v) pixels of the current image, the non-crowd objects'
                 keypoints (only when the dataset has keypoints); v in {0, 1, 2}, a point with
                 v = 0 is (0, 0, 0)
  after `pad_instances`: M -> max_instances, Mc -> max_crowd_instances, plus
  gt_valid       [M] bool, crowd_valid [Mc] bool, num_dropped [] int32 (objects beyond
                 max_instances), num_crowd_dropped [] int32.

Mask crops: row i, column j of an object's crop is the mask's bilinear value at the point
  (x1 + (j + 0.5) * (x2 - x1) / S, y1 + (i + 0.5) * (y2 - y1) / S)
in continuous pixel coordinates (pixel k spans [k, k + 1), its centre is k + 0.5), values at the
image border replicated: torchvision's `roi_align(mask, box, S, aligned=True, sampling_ratio=1)`.
Geometric transforms keep boxes and crops consistent: a flip mirrors both, a resize scales boxes
(the crop covers the same object region), a crop re-samples the crop to the clipped box.

Keypoints move with the boxes: a resize scales x and y, a flip maps x to W - x (W the image width
before padding, as torchvision's `_flip_coco_person_keypoints`) and swaps left and right points
(`flip_permutation`, see `maskrcnn_jax.data.keypoints`), a crop shifts them. A labelled point that
ends up outside the image [0, w] x [0, h] (inclusive) is removed: v = 0 and (0, 0, 0).
"""
import tensorflow as tf

try:  # This package never needs a GPU; leave it to jax.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (the caller got there first).
  pass

IMAGE_MEAN = (0.485, 0.456, 0.406)   # torchvision's, for RGB images in [0, 1]
IMAGE_STD = (0.229, 0.224, 0.225)

_SALTS = {"resize_short_side": 11, "resize_to_fit": 12, "crop": 13, "random_flip": 14}


def compose(transforms):
  """Chains `features -> features` functions left to right."""
  transforms = list(transforms)

  def apply(features):
    for t in transforms:
      features = t(features)
    return features
  return apply


def _seed(features, name):
  if "seed" not in features:
    raise KeyError(f"{name} is random and needs features['seed'] ([2] int; the pipeline sets it)")
  return tf.random.experimental.stateless_fold_in(tf.cast(features["seed"], tf.int64),
                                                  _SALTS[name])


# ----------------------------------------------------------------------------------------------
# Masks: RLE decoding and box crops.

def decode_rle(counts, row_lengths, height, width):
  """Full-image masks from concatenated uncompressed COCO RLE counts.

  Args:
    counts: [R] int32 run lengths of all masks, concatenated (each mask's runs start with zeros,
      column-major order; they sum to height * width per mask).
    row_lengths: [M] int32 number of runs of each mask.
    height, width: scalar int32 mask size.

  Returns:
    [M, height, width] uint8 in {0, 1}.
  """
  # The value flips at every boundary between two runs. Mark the boundaries in one flat array
  # (zero-length runs mark a position twice, which cancels), then a cumulative sum gives, modulo 2,
  # the value at every pixel. (tf.repeat would do too, but costs O(runs * longest run).)
  counts = tf.cast(counts, tf.int32)
  row_lengths = tf.cast(row_lengths, tf.int32)
  m = tf.shape(row_lengths)[0]
  area = height * width
  total = m * area
  starts = tf.cumsum(row_lengths, exclusive=True)
  mask_of_run = tf.repeat(tf.range(m), row_lengths)
  ends = tf.cumsum(counts) - tf.gather(tf.cumsum(counts, exclusive=True), tf.gather(starts,
                                                                                    mask_of_run))
  run_index = tf.range(tf.shape(counts)[0]) - tf.gather(starts, mask_of_run)
  is_last = run_index == tf.gather(row_lengths, mask_of_run) - 1
  pos = tf.boolean_mask(mask_of_run * area + ends, tf.logical_not(is_last))
  flips = tf.scatter_nd(pos[:, None], tf.ones_like(pos), [total])
  # Flips made by earlier masks, to subtract from each mask's running count.
  before = tf.cumsum(row_lengths - 1, exclusive=True)
  parity = tf.reshape(tf.cumsum(flips), [m, area]) - before[:, None]
  masks = tf.cast(tf.bitwise.bitwise_and(parity, 1), tf.uint8)
  return tf.transpose(tf.reshape(masks, [m, width, height]), [0, 2, 1])


def _sample_axis(lo, hi, n, size):
  """Bilinear sample indices along one axis for crops of [lo, hi] at `size` bin centres.

  Returns i0, i1 [M, S] int32 (clamped to [0, n - 1]) and frac [M, S] float32, the weight of i1."""
  grid = (tf.range(size, dtype=tf.float32) + 0.5) / float(size)
  pos = lo[:, None] + grid[None, :] * (hi - lo)[:, None] - 0.5           # [M, S]
  pos = tf.maximum(pos, 0.0)
  i0 = tf.minimum(tf.cast(tf.floor(pos), tf.int32), n - 1)
  i1 = tf.minimum(i0 + 1, n - 1)
  frac = tf.clip_by_value(pos - tf.cast(i0, tf.float32), 0.0, 1.0)
  return i0, i1, frac


def _bilinear(v00, v01, v10, v11, fy, fx):
  """Combines corner values [M, S, S] (v<y><x>) with weights fy [M, S] (rows), fx [M, S] (cols)."""
  left = v00 * (1.0 - fy[:, :, None]) + v10 * fy[:, :, None]
  right = v01 * (1.0 - fy[:, :, None]) + v11 * fy[:, :, None]
  return left * (1.0 - fx[:, None, :]) + right * fx[:, None, :]


def crop_and_resize(masks, boxes, size):
  """Cuts each mask to its box and resamples it to `size` x `size`, bilinear.

  Args:
    masks: [M, H, W] any numeric dtype (one mask per box).
    boxes: [M, 4] float32 (x1, y1, x2, y2) in the masks' pixel coordinates.
    size: S, output side.

  Returns:
    [M, S, S] float32; out[m, i, j] is masks[m] sampled bilinearly at
    (x1 + (j + 0.5) (x2 - x1) / S - 0.5, y1 + (i + 0.5) (y2 - y1) / S - 0.5) in pixel-index
    coordinates, clamped to [0, W - 1] x [0, H - 1] (border values replicated), as torchvision's
    `roi_align(..., aligned=True, sampling_ratio=1)`.
  """
  boxes = tf.cast(boxes, tf.float32)
  shape = tf.shape(masks)
  y0, y1, fy = _sample_axis(boxes[:, 1], boxes[:, 3], shape[1], size)
  x0, x1, fx = _sample_axis(boxes[:, 0], boxes[:, 2], shape[2], size)
  rows = tf.gather(masks, tf.concat([y0, y1], 1), axis=1, batch_dims=1)   # [M, 2S, W]
  grid = tf.cast(tf.gather(rows, tf.concat([x0, x1], 1), axis=2, batch_dims=1), tf.float32)
  return _bilinear(grid[:, :size, :size], grid[:, :size, size:], grid[:, size:, :size],
                   grid[:, size:, size:], fy, fx)


def crop_and_resize_rle(counts, row_lengths, boxes, height, width, size):
  """`crop_and_resize(decode_rle(counts, row_lengths, height, width), boxes, size)`, without
  decoding the full masks: the 2S x 2S pixels the bilinear samples need are looked up in the runs
  directly (binary search), so the cost does not grow with the image size.

  Args:
    counts: [R] int32 concatenated uncompressed RLE counts (see `decode_rle`).
    row_lengths: [M] int32 runs per mask.
    boxes: [M, 4] float32 (x1, y1, x2, y2) pixels.
    height, width: mask size.
    size: S.

  Returns:
    [M, S, S] float32, equal to the decode-then-crop result.
  """
  boxes = tf.cast(boxes, tf.float32)
  row_lengths = tf.cast(row_lengths, tf.int64)
  m = tf.shape(boxes)[0]
  y0, y1, fy = _sample_axis(boxes[:, 1], boxes[:, 3], height, size)
  x0, x1, fx = _sample_axis(boxes[:, 0], boxes[:, 2], width, size)
  ys = tf.cast(tf.concat([y0, y1], 1), tf.int64)                         # [M, 2S]
  xs = tf.cast(tf.concat([x0, x1], 1), tf.int64)
  h64 = tf.cast(height, tf.int64)
  area = h64 * tf.cast(width, tf.int64)
  # Column-major pixel index, offset by the mask's place in the concatenation: every mask's runs
  # sum to `area`, so the running sum of all counts gives each run's end in the same frame.
  pos = (tf.range(tf.cast(m, tf.int64))[:, None, None] * area + xs[:, None, :] * h64 +
         ys[:, :, None])                                                 # [M, 2S, 2S]
  ends = tf.cumsum(tf.cast(counts, tf.int64))
  run = tf.searchsorted(ends[None, :], tf.reshape(pos, [1, -1]), side="right",
                       out_type=tf.int64)[0]
  first = tf.cumsum(row_lengths, exclusive=True)
  local = tf.reshape(run, tf.shape(pos)) - first[:, None, None]
  grid = tf.cast(local % 2, tf.float32)
  return _bilinear(grid[:, :size, :size], grid[:, :size, size:], grid[:, size:, :size],
                   grid[:, size:, size:], fy, fx)


# ----------------------------------------------------------------------------------------------
# Decoding.

def decode_coco_example(mask_crop_size=112):
  """tfds `CocoFormat` example -> features (see the module docstring).

  Decodes the image (if still encoded), splits crowd from non-crowd objects, and cuts the
  non-crowd masks to their boxes at the original resolution, straight from their RLE. When the
  example has `objects/keypoints` [M, K, 3], the non-crowd objects' keypoints become
  `gt_keypoints`.
  """
  def fn(ex):
    image = ex["image"]
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=3, expand_animations=False)
    image = tf.ensure_shape(image, [None, None, 3])
    size = tf.shape(image)[:2]
    objects = ex["objects"]
    is_crowd = tf.cast(objects["is_crowd"], tf.bool)
    keep = tf.where(tf.logical_not(is_crowd))[:, 0]
    crowd = tf.where(is_crowd)[:, 0]
    boxes = tf.reshape(tf.cast(objects["bbox_xyxy"], tf.float32), [-1, 4])
    rle = tf.RaggedTensor.from_row_lengths(ex["mask_rle"], tf.cast(objects["mask_rle_length"],
                                                                   tf.int64))
    rle = tf.gather(rle, keep)
    gt_boxes = tf.gather(boxes, keep)
    out = {
        "image": image,
        "image_id": tf.cast(ex["image/id"], tf.int64),
        "original_size": tf.cast(size, tf.int32),
        "image_size": tf.cast(size, tf.int32),
        "scale": tf.ones([2], tf.float32),
        "gt_boxes": gt_boxes,
        "gt_classes": tf.cast(tf.gather(objects["label"], keep), tf.int32) + 1,
        "gt_masks": crop_and_resize_rle(rle.flat_values, rle.row_lengths(), gt_boxes, size[0],
                                        size[1], mask_crop_size),
        "crowd_boxes": tf.gather(boxes, crowd),
    }
    if "keypoints" in objects:
      kps = tf.cast(objects["keypoints"], tf.float32)
      out["gt_keypoints"] = _zero_unlabelled(tf.gather(kps, keep))
    if "seed" in ex:
      out["seed"] = ex["seed"]
    return out
  return fn


# ----------------------------------------------------------------------------------------------
# Geometry.

def _zero_unlabelled(keypoints):
  """[M, K, 3] (x, y, v): points with v <= 0 set to (0, 0, 0)."""
  return keypoints * tf.cast(keypoints[..., 2:3] > 0, keypoints.dtype)


def _keypoints_in_window(keypoints, offset_xy, h, w):
  """Shifts labelled keypoints [M, K, 3] by -offset_xy [2] and removes (sets to (0, 0, 0)) those
  outside [0, w] x [0, h]."""
  xy = keypoints[..., :2] - offset_xy
  inside = ((xy[..., 0] >= 0) & (xy[..., 0] <= w) & (xy[..., 1] >= 0) & (xy[..., 1] <= h) &
            (keypoints[..., 2] > 0))
  return tf.concat([xy, keypoints[..., 2:]], -1) * tf.cast(inside, keypoints.dtype)[..., None]


def _resize_image(features, new_h, new_w):
  image = tf.image.resize(features["image"], tf.stack([new_h, new_w]), method="bilinear",
                          antialias=False)
  old = tf.cast(features["image_size"], tf.float32)
  ratio = tf.stack([tf.cast(new_h, tf.float32) / old[0], tf.cast(new_w, tf.float32) / old[1]])
  box_scale = tf.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
  out = dict(features)
  out["image"] = image
  out["image_size"] = tf.cast(tf.stack([new_h, new_w]), tf.int32)
  out["scale"] = features["scale"] * ratio
  out["gt_boxes"] = features["gt_boxes"] * box_scale
  out["crowd_boxes"] = features["crowd_boxes"] * box_scale
  if "gt_keypoints" in features:
    kps = features["gt_keypoints"] * tf.stack([ratio[1], ratio[0], 1.0])
    # Nothing leaves the image in a resize; clamping only undoes float rounding at the far edge.
    limit = tf.stack([tf.cast(new_w, tf.float32), tf.cast(new_h, tf.float32), 2.0])
    out["gt_keypoints"] = tf.clip_by_value(kps, 0.0, limit)
  return out


def resize_short_side(min_size=800, max_size=1333):
  """torchvision-style resize: short side to `min_size`, long side capped at `max_size`.

  The size is `maskrcnn_jax.data.preprocess.resized_size` (float64 scale, floor), the image is
  resampled bilinearly (half-pixel centres, no antialiasing) and boxes are scaled by new / old size
  per axis, as torchvision's `GeneralizedRCNNTransform` does.

  Args:
    min_size: int, or a sequence of ints: one is drawn per example (torchvision's multi-scale
      training; needs features['seed']).
    max_size: cap on the long side.
  """
  sizes = (min_size,) if isinstance(min_size, (int, float)) else tuple(min_size)

  def fn(features):
    if len(sizes) > 1:
      i = tf.random.stateless_uniform([], _seed(features, "resize_short_side"), 0, len(sizes),
                                      dtype=tf.int32)
      target = tf.gather(tf.constant(sizes, tf.float64), i)
    else:
      target = tf.constant(float(sizes[0]), tf.float64)
    hw = tf.cast(features["image_size"], tf.float64)
    scale = tf.minimum(target / tf.reduce_min(hw), float(max_size) / tf.reduce_max(hw))
    new = tf.cast(tf.floor(hw * scale), tf.int32)
    return _resize_image(features, new[0], new[1])
  return fn


def resize_to_fit(output_size=(1024, 1024), scale_range=(1.0, 1.0)):
  """TPU-style resize: scale so the image fits `output_size` (long side to its size for a square),
  with optional scale jitter and a random crop back to `output_size`.

  scale = min(out_h / h, out_w / w) * r, r ~ U(scale_range) (r = 1 when the range is a single
  point); new size = round(size * scale). If the result is larger than `output_size`, a random
  window of `output_size` is cut out: boxes are shifted and clipped to it, objects left with no
  area are removed, and the mask crops of clipped objects are re-sampled to their clipped boxes.

  Args:
    output_size: (height, width) the image must fit in.
    scale_range: (low, high) jitter factors, e.g. (0.8, 1.25), or (0.1, 2.0) for large-scale
      jitter. Random when low != high (needs features['seed']).
  """
  out_h, out_w = (int(s) for s in output_size)
  lo, hi = (float(s) for s in scale_range)

  def fn(features):
    hw = tf.cast(features["image_size"], tf.float32)
    scale = tf.minimum(out_h / hw[0], out_w / hw[1])
    if lo != hi:
      scale *= tf.random.stateless_uniform([], _seed(features, "resize_to_fit"), lo, hi)
    elif lo != 1.0:
      scale *= lo
    new = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    if hi <= 1.0:  # Never larger than the output, even after rounding.
      new = tf.minimum(new, tf.constant([out_h, out_w]))
    features = _resize_image(features, new[0], new[1])
    if hi > 1.0:
      features = random_crop((out_h, out_w))(features)
    return features
  return fn


def _clip_boxes(boxes, offset_xy, h, w):
  shifted = boxes - tf.tile(offset_xy, [2])[None, :]
  limit = tf.stack([w, h, w, h])
  clipped = tf.clip_by_value(shifted, 0.0, limit[None, :])
  keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  return shifted, clipped, keep


def random_crop(crop_size):
  """Cuts a random `crop_size` window out of an image larger than it (a no-op along a side that
  already fits). Boxes are shifted and clipped; objects with no area left are removed; mask crops
  of clipped objects are re-sampled to the clipped part of their box; keypoints are shifted and
  those outside the window [0, w] x [0, h] removed (v = 0, (0, 0, 0)). Needs features['seed']."""
  crop_h, crop_w = (int(s) for s in crop_size)

  def fn(features):
    size = features["image_size"]
    room = tf.maximum(size - tf.constant([crop_h, crop_w]), 0)
    u = tf.random.stateless_uniform([2], _seed(features, "crop"), 0.0, 1.0)
    offset = tf.cast(tf.floor(u * tf.cast(room + 1, tf.float32)), tf.int32)
    offset = tf.minimum(offset, room)
    new_size = tf.minimum(size, tf.constant([crop_h, crop_w]))
    image = features["image"][offset[0]:offset[0] + new_size[0],
                              offset[1]:offset[1] + new_size[1]]
    off_xy = tf.cast(tf.stack([offset[1], offset[0]]), tf.float32)
    h, w = tf.cast(new_size[0], tf.float32), tf.cast(new_size[1], tf.float32)
    shifted, clipped, keep = _clip_boxes(features["gt_boxes"], off_xy, h, w)
    # The clipped box in the crop's own coordinates (the old box spans [0, S] x [0, S]).
    masks = features["gt_masks"]
    s = masks.shape[-1]
    bw = tf.maximum(shifted[:, 2] - shifted[:, 0], 1e-6)
    bh = tf.maximum(shifted[:, 3] - shifted[:, 1], 1e-6)
    sub = tf.stack([(clipped[:, 0] - shifted[:, 0]) / bw, (clipped[:, 1] - shifted[:, 1]) / bh,
                    (clipped[:, 2] - shifted[:, 0]) / bw, (clipped[:, 3] - shifted[:, 1]) / bh],
                   axis=1) * float(s)
    changed = tf.reduce_any(tf.not_equal(clipped, shifted))
    masks = tf.cond(changed, lambda: tf.cast(crop_and_resize(masks, sub, s), masks.dtype),
                    lambda: masks)
    _, crowd, crowd_keep = _clip_boxes(features["crowd_boxes"], off_xy, h, w)
    out = dict(features)
    out["image"] = image
    out["image_size"] = new_size
    out["gt_boxes"] = tf.boolean_mask(clipped, keep)
    out["gt_classes"] = tf.boolean_mask(features["gt_classes"], keep)
    out["gt_masks"] = tf.boolean_mask(masks, keep)
    out["crowd_boxes"] = tf.boolean_mask(crowd, crowd_keep)
    if "gt_keypoints" in features:
      kps = _keypoints_in_window(features["gt_keypoints"], off_xy, h, w)
      out["gt_keypoints"] = tf.boolean_mask(kps, keep)
    return out
  return fn


def flip_left_right(features, keypoint_flip_permutation=None):
  """Mirrors image, boxes (x -> width - x) and mask crops (last axis) of one example, and its
  keypoints if it has `gt_keypoints`.

  Args:
    features: one example; width = features['image_size'][1] (the image before padding).
    keypoint_flip_permutation: K ints, needed with gt_keypoints: point k of the flipped object is
      the mirror of point `perm[k]` (left and right swapped; `keypoints.flip_permutation(names)`).
      x -> width - x, v unchanged, unlabelled points stay (0, 0, 0).
  """
  w = tf.cast(features["image_size"][1], tf.float32)

  def flip_boxes(b):
    return tf.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)
  out = dict(features)
  out["image"] = tf.reverse(features["image"], axis=[1])
  out["gt_boxes"] = flip_boxes(features["gt_boxes"])
  out["crowd_boxes"] = flip_boxes(features["crowd_boxes"])
  out["gt_masks"] = tf.reverse(features["gt_masks"], axis=[2])
  if "gt_keypoints" in features:
    if keypoint_flip_permutation is None:
      raise ValueError("flipping keypoints needs keypoint_flip_permutation (which point becomes "
                       "which; keypoints.flip_permutation(names) gives it from the names)")
    perm = list(keypoint_flip_permutation)
    k = features["gt_keypoints"].shape[1]
    if k is not None and len(perm) != k:
      raise ValueError(f"keypoint_flip_permutation has {len(perm)} entries for {k} keypoints")
    kps = tf.gather(features["gt_keypoints"], perm, axis=1)
    kps = tf.stack([w - kps[..., 0], kps[..., 1], kps[..., 2]], axis=-1)
    out["gt_keypoints"] = _zero_unlabelled(kps)
  return out


def random_flip(prob=0.5, keypoint_flip_permutation=None):
  """Horizontal flip of image, boxes, mask crops (and keypoints, see `flip_left_right`) with
  probability `prob` (features['seed']).

  Apply it before `pad_image` (it mirrors the whole image). The default training chain flips
  right after decoding, where the image is still small and uint8 (flips commute with resizing)."""
  def fn(features):
    keys = ("image", "gt_boxes", "crowd_boxes", "gt_masks")
    if "gt_keypoints" in features:
      keys += ("gt_keypoints",)
    do = tf.random.stateless_uniform([], _seed(features, "random_flip")) < prob
    values = tf.cond(do, lambda: tuple(flip_left_right(features, keypoint_flip_permutation)[k]
                                       for k in keys),
                     lambda: tuple(features[k] for k in keys))
    out = dict(features)
    out.update(zip(keys, values))
    return out
  return fn


# ----------------------------------------------------------------------------------------------
# Values and shapes.

def normalize(mean=IMAGE_MEAN, std=IMAGE_STD):
  """image -> (image / 255 - mean) / std, float32 (torchvision's statistics by default).

  Computed as one multiply-add, image * (1 / (255 std)) - mean / std, to touch the (large) image
  once; equal to the three-step formula up to float32 rounding (~1e-6)."""
  mul = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
  add = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)

  def fn(features):
    out = dict(features)
    out["image"] = tf.cast(features["image"], tf.float32) * mul + add
    return out
  return fn


def quantize_image():
  """image (float32 in [0, 255], after resizing) -> uint8, rounded: 4x fewer bytes to the device,
  which normalizes it there (`ops.images.normalize_images`). Rounding moves a pixel by at most
  0.5 / 255, ~0.009 after normalization."""

  def fn(features):
    out = dict(features)
    out["image"] = tf.cast(tf.round(tf.clip_by_value(tf.cast(features["image"], tf.float32), 0.0,
                                                     255.0)), tf.uint8)
    return out
  return fn


def pad_image(size):
  """Pads the image with zeros at the bottom and right to `size` = (height, width); error if it is
  larger. `image_size` keeps the unpadded size."""
  h, w = (int(s) for s in size)

  def fn(features):
    image = features["image"]
    shape = tf.shape(image)
    check = tf.debugging.assert_less_equal(
        shape[:2], tf.constant([h, w]),
        message=f"pad_image: image larger than the padded size {(h, w)}")
    with tf.control_dependencies([check]):
      image = tf.pad(image, [[0, h - shape[0]], [0, w - shape[1]], [0, 0]])
    out = dict(features)
    out["image"] = tf.ensure_shape(image, [h, w, 3])
    return out
  return fn


def _pad_rows(x, n):
  pad = tf.maximum(n - tf.shape(x)[0], 0)
  paddings = tf.concat([[[0, pad]], tf.zeros([tf.rank(x) - 1, 2], tf.int32)], axis=0)
  return tf.pad(x, paddings)


def _keep_largest(boxes, limit):
  """Indices (in original order) of the `limit` largest boxes, and how many were dropped."""
  n = tf.shape(boxes)[0]
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  k = tf.minimum(n, limit)
  _, idx = tf.math.top_k(area, k=k, sorted=True)
  return tf.sort(idx), n - k


def pad_instances(max_instances=100, max_crowd_instances=20):
  """Pads objects to fixed counts with validity masks.

  If an image has more than `max_instances` non-crowd objects, the largest (box area) are kept, in
  their original order, and the rest counted in `num_dropped` (gt_keypoints follow the same
  selection; padding rows are all zeros); likewise for crowd boxes.
  """
  def fn(features):
    idx, dropped = _keep_largest(features["gt_boxes"], max_instances)
    cidx, cdropped = _keep_largest(features["crowd_boxes"], max_crowd_instances)
    s = features["gt_masks"].shape[-1]
    out = dict(features)
    out["gt_boxes"] = tf.ensure_shape(
        _pad_rows(tf.gather(features["gt_boxes"], idx), max_instances), [max_instances, 4])
    out["gt_classes"] = tf.ensure_shape(
        _pad_rows(tf.gather(features["gt_classes"], idx), max_instances), [max_instances])
    out["gt_masks"] = tf.ensure_shape(
        _pad_rows(tf.gather(features["gt_masks"], idx), max_instances), [max_instances, s, s])
    if "gt_keypoints" in features:
      k = features["gt_keypoints"].shape[1]
      out["gt_keypoints"] = tf.ensure_shape(
          _pad_rows(tf.gather(features["gt_keypoints"], idx), max_instances),
          [max_instances, k, 3])
    out["gt_valid"] = tf.range(max_instances) < tf.shape(idx)[0]
    out["num_dropped"] = tf.cast(dropped, tf.int32)
    out["crowd_boxes"] = tf.ensure_shape(
        _pad_rows(tf.gather(features["crowd_boxes"], cidx), max_crowd_instances),
        [max_crowd_instances, 4])
    out["crowd_valid"] = tf.range(max_crowd_instances) < tf.shape(cidx)[0]
    out["num_crowd_dropped"] = tf.cast(cdropped, tf.int32)
    return out
  return fn


def binarize_masks(threshold=0.5):
  """gt_masks float [.., S, S] -> uint8 {0, 1} (value >= threshold); 4x less to move."""
  def fn(features):
    out = dict(features)
    out["gt_masks"] = tf.cast(features["gt_masks"] >= threshold, tf.uint8)
    return out
  return fn


def select(keys):
  """Keeps only `keys` (drops working entries such as 'seed')."""
  keys = tuple(keys)

  def fn(features):
    return {k: features[k] for k in keys if k in features}
  return fn

