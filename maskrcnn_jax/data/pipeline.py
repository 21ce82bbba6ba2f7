"""tf.data pipeline: a prepared `CocoFormat` dataset -> fixed-shape numpy batches.

    builder = prepare_coco_format("/data/coco", "/data/tfds")
    batches = make_dataset(builder, "train", batch_size=8, training=True, seed=0,
                           process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(batches)

Batch keys (B batch, M max_instances, Mc max_crowd_instances, S mask_crop_size, (Hp, Wp) the padded
image size):

  image            [B, Hp, Wp, 3] float32, RGB normalized with torchvision's mean/std on [0, 1],
                   zero-padded at the bottom and right (with image_dtype='uint8': the resized
                   RGB values rounded to uint8, zero-padded, normalized on the device by
                   `ops.images.normalize_images`)
  image_size       [B, 2] int32 (height, width) of the resized image before padding
  original_size    [B, 2] int32 (height, width) of the stored image
  scale            [B, 2] float32 (scale_y, scale_x) = resized / original size; boxes in original
                   pixels = boxes / (scale_x, scale_y, scale_x, scale_y) (no crop in evaluation)
  image_id         [B] int64 COCO image id
  gt_boxes         [B, M, 4] float32 (x1, y1, x2, y2) pixels of the resized image
  gt_classes       [B, M] int32 contiguous class 1..K, 0 on padding (see `categories.json`)
  gt_masks         [B, M, S, S] float32 in [0, 1] (uint8 {0, 1} with mask_dtype='uint8'): each
                   object's mask cut to its box and resampled to S x S (transforms.crop_and_resize)
  gt_valid         [B, M] bool
  crowd_boxes      [B, Mc, 4] float32 (x1, y1, x2, y2) pixels of the resized image
  crowd_valid      [B, Mc] bool
  gt_keypoints     [B, M, K, 3] float32 (x, y, v) pixels of the resized image (the frame of
                   gt_boxes), v in {0, 1, 2} (COCO: 0 not labelled, 1 occluded, 2 visible); a point
                   with v = 0 is (0, 0, 0); padding rows are all zeros. Aligned with gt_boxes (same
                   objects, same order). Only for datasets with keypoints (K = number of names,
                   `builder.load_keypoint_info`); absent otherwise.
  num_dropped      [B] int32 non-crowd objects beyond M that were dropped (the smallest go)
  num_crowd_dropped [B] int32 the same for crowd boxes
  example_valid    [B] bool: False on the padding examples that fill the last evaluation batches

This module imports TensorFlow and tfds only (never jax): the caller passes
`process_index=jax.process_index(), process_count=jax.process_count()`.
"""
import math
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from maskrcnn_jax.data import builder as builder_lib, keypoints as kp_lib, transforms as T

try:  # This package never needs a GPU; leave it to jax.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (the caller got there first).
  pass

OUTPUT_KEYS = ("image", "image_size", "original_size", "scale", "image_id", "gt_boxes",
               "gt_classes", "gt_masks", "gt_valid", "crowd_boxes", "crowd_valid", "num_dropped",
               "num_crowd_dropped", "example_valid", "gt_keypoints")


def default_transforms(*, training, image_size=(1024, 1024), max_instances=100,
                       mask_crop_size=112, resize="fit", min_size=800, max_size=1333,
                       scale_range=None, flip_prob=0.5, max_crowd_instances=20,
                       mask_dtype="float32", keypoint_flip_permutation=None,
                       image_dtype="float32"):
  """The standard chain: decode, (flip), resize, normalize, pad image, pad instances.

  Args:
    training: adds the random flip and the scale jitter.
    image_size: (Hp, Wp) padded output size; with resize='fit' the image is scaled to fit it.
    max_instances, max_crowd_instances: fixed object counts M and Mc.
    mask_crop_size: S.
    resize: 'fit' (TPU style: scale to fit image_size, long side to its size for a square) or
      'short_side' (torchvision style: short side to min_size, long side at most max_size;
      image_size must hold the result, e.g. (1344, 1344) for 800/1333).
    min_size: int, or a tuple to draw from per example in training (torchvision multi-scale).
    scale_range: (low, high) jitter for resize='fit' in training (default (1, 1): none), e.g.
      (0.8, 1.25); the image is randomly cropped back to image_size when larger.
    flip_prob: probability of a horizontal flip in training.
    mask_dtype: 'float32' (soft [0, 1]) or 'uint8' (binarized at 0.5).
    keypoint_flip_permutation: K ints, how the flip reorders keypoints (`build_dataset` derives it
      from the dataset's keypoint names); needed when the examples have keypoints.
    image_dtype: 'float32' (normalized here) or 'uint8' (rounded, normalized on the device).
  """
  if image_dtype not in ("float32", "uint8"):
    raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {image_dtype!r}")
  chain = [T.decode_coco_example(mask_crop_size)]
  if training and flip_prob > 0:
    # Flipping commutes with resizing; done first, it moves the small uint8 image, not the
    # resized float32 one.
    chain.append(T.random_flip(flip_prob, keypoint_flip_permutation))
  if resize == "fit":
    chain.append(T.resize_to_fit(image_size, scale_range if (training and scale_range) else
                                 (1.0, 1.0)))
  elif resize == "short_side":
    sizes = min_size if training or isinstance(min_size, (int, float)) else min_size[-1]
    chain.append(T.resize_short_side(sizes, max_size))
  else:
    raise ValueError(f"resize must be 'fit' or 'short_side', got {resize!r}")
  chain += [T.normalize() if image_dtype == "float32" else T.quantize_image(),
            T.pad_image(image_size),
            T.pad_instances(max_instances, max_crowd_instances)]
  if mask_dtype == "uint8":
    chain.append(T.binarize_masks())
  elif mask_dtype != "float32":
    raise ValueError(f"mask_dtype must be 'float32' or 'uint8', got {mask_dtype!r}")
  return chain


def host_split(split, process_index=None, process_count=None):
  """This host's part of `split`: `tfds.even_splits(split, process_count)[process_index]`."""
  process_index = 0 if process_index is None else int(process_index)
  process_count = 1 if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]


def read_split(builder, split, *, shuffle=False, seed=0, process_index=None, process_count=None):
  """The one reader of a prepared split: a `tf.data.Dataset` of this host's examples with the
  image still encoded (bytes), for `build_dataset` (training and fixed-shape evaluation batches)
  and `read_examples` (evaluation through `predict`'s torchvision-exact preprocessing).

  Args:
    builder: a prepared tfds builder, or its directory.
    split: tfds split, e.g. 'validation'.
    shuffle: shuffle the files (seeded by `seed`); off: the stored order.
    process_index, process_count: this host's share (`host_split`).
  """
  builder = _as_builder(builder)
  read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False,
                                interleave_cycle_length=16 if shuffle else 1)
  return builder.as_dataset(split=host_split(split, process_index, process_count),
                            shuffle_files=bool(shuffle), read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})


def read_examples(builder, split, max_images=None):
  """Yields `(image, example, error)` for each image of `split` in the stored order: image a
  decoded [H, W, 3] uint8 RGB array (None when it fails to decode, with `error` saying why, so a
  bad file is reported and skipped, not fatal), example the prepared record as numpy (boxes,
  RLE masks, ids in original pixels), error None otherwise.

  Args:
    builder: a prepared tfds builder, or its directory.
    split: tfds split.
    max_images: stop after this many images (None: all).
  """
  ds = read_split(builder, split)
  for i, ex in enumerate(tfds.as_numpy(ds)):
    if max_images is not None and i >= max_images:
      return
    try:
      image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False).numpy()
    except (tf.errors.InvalidArgumentError, ValueError) as err:
      yield None, ex, f"{ex['image/filename'].decode()}: {str(err).splitlines()[0]}"
      continue
    yield image, ex, None


def _as_builder(builder):
  if isinstance(builder, (str, os.PathLike)):
    return tfds.builder_from_directory(os.fspath(builder))
  return builder


def _has_objects(ex):
  return tf.reduce_any(tf.logical_not(tf.cast(ex["objects"]["is_crowd"], tf.bool)))


def _has_enough_keypoints(min_keypoints):
  """torchvision's `_has_valid_annotation` (references/detection/coco_utils.py) on the non-crowd
  objects of a stored example: False without objects, when every box has a side <= 1 pixel, or
  with fewer than `min_keypoints` labelled (v > 0) keypoints in total."""
  def fn(ex):
    objects = ex["objects"]
    real = tf.logical_not(tf.cast(objects["is_crowd"], tf.bool))
    boxes = tf.reshape(tf.cast(objects["bbox_xyxy"], tf.float32), [-1, 4])
    sized = (boxes[:, 2] - boxes[:, 0] > 1.0) & (boxes[:, 3] - boxes[:, 1] > 1.0)
    labelled = tf.cast(objects["keypoints"][..., 2] > 0, tf.int32)              # [M, K]
    count = tf.reduce_sum(labelled * tf.cast(real, tf.int32)[:, None])
    return tf.reduce_any(real & sized) & (count >= min_keypoints)
  return fn


def keypoint_flip_permutation_for(builder, override=None):
  """The flip permutation of a prepared dataset's keypoints (None when it has none).

  Args:
    builder: a prepared tfds builder, or its directory.
    override: K ints replacing the permutation derived from the names (`left_<s>` <->
      `right_<s>`); None or () for the derived one.
  """
  builder = _as_builder(builder)
  if not _has_keypoint_features(builder):
    if override is not None and len(tuple(override)):
      raise ValueError("keypoint_flip_permutation given, but the dataset has no keypoints")
    return None
  info = builder_lib.load_keypoint_info(builder)
  return kp_lib.resolve_flip_permutation(info["names"], override)


def _has_keypoint_features(builder):
  return "keypoints" in builder.info.features["objects"].feature.keys()


def build_dataset(builder, split, *, batch_size, training, image_size=(1024, 1024),
                  max_instances=100, mask_crop_size=112, seed=0, shuffle=None,
                  shuffle_buffer=1024, num_epochs=None, keep_empty=None, process_index=None,
                  process_count=None, drop_remainder=None, transforms=None, resize="fit",
                  min_size=800, max_size=1333, scale_range=None, flip_prob=0.5,
                  max_crowd_instances=20, mask_dtype="float32", prefetch=2,
                  num_parallel_calls=tf.data.AUTOTUNE, start_batch=0, min_keypoints_per_image=0,
                  keypoint_flip_permutation=None, image_dtype="float32"):
  """The `tf.data.Dataset` of batches that `make_dataset` iterates (arguments as there)."""
  builder = _as_builder(builder)
  min_keypoints_per_image = int(min_keypoints_per_image)
  if min_keypoints_per_image and not _has_keypoint_features(builder):
    raise ValueError(f"min_keypoints_per_image={min_keypoints_per_image}, but the dataset has no "
                     "keypoints")
  flip_perm = keypoint_flip_permutation_for(builder, keypoint_flip_permutation)
  training = bool(training)
  shuffle = training if shuffle is None else bool(shuffle)
  keep_empty = (not training) if keep_empty is None else bool(keep_empty)
  drop_remainder = training if drop_remainder is None else bool(drop_remainder)
  if num_epochs is None:
    num_epochs = None if training else 1
  process_index = 0 if process_index is None else int(process_index)
  process_count = 1 if process_count is None else int(process_count)
  if transforms is None:
    transforms = default_transforms(
        training=training, image_size=image_size, max_instances=max_instances,
        mask_crop_size=mask_crop_size, resize=resize, min_size=min_size, max_size=max_size,
        scale_range=scale_range, flip_prob=flip_prob, max_crowd_instances=max_crowd_instances,
        mask_dtype=mask_dtype, keypoint_flip_permutation=flip_perm, image_dtype=image_dtype)
  chain = T.compose(list(transforms) + [_add_example_valid, T.select(OUTPUT_KEYS)])

  ds = read_split(builder, split, shuffle=shuffle, seed=seed, process_index=process_index,
                  process_count=process_count)
  if not keep_empty:
    ds = ds.filter(_has_objects)
  if training and min_keypoints_per_image > 0:
    ds = ds.filter(_has_enough_keypoints(min_keypoints_per_image))
  if shuffle:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.enumerate()
  if start_batch:
    # After enumerate: the skipped examples keep their indices, so every later example gets the
    # random transforms (seeded by its index) it would have had in an uninterrupted run.
    ds = ds.skip(int(start_batch) * int(batch_size))
  host_offset = process_index << 40

  def apply(i, ex):
    ex = dict(ex)
    ex["seed"] = tf.stack([tf.constant(seed, tf.int64), i + host_offset])
    return chain(ex)
  ds = ds.map(apply, num_parallel_calls=num_parallel_calls, deterministic=True)

  if not drop_remainder:
    # Fixed shapes in evaluation too: fill the last batch (and, across hosts, up to the same number
    # of batches on every host) with zero examples marked example_valid=False.
    counts = [builder.info.splits[host_split(split, i, process_count)].num_examples
              for i in range(process_count)]
    if keep_empty and num_epochs == 1:
      total = math.ceil(max(counts) / batch_size) * batch_size
      pad = total - counts[process_index]
      if pad:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(_zeros_like_spec(ds.element_spec))
                            .repeat(pad))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  ds = ds.with_options(options)
  return ds.prefetch(prefetch)


def _add_example_valid(features):
  out = dict(features)
  out["example_valid"] = tf.constant(True)
  return out


def _zeros_like_spec(spec):
  def zeros(s):
    if not s.shape.is_fully_defined():
      raise ValueError(f"evaluation padding needs static shapes, got {s}")
    return tf.zeros(s.shape, s.dtype)
  return tf.nest.map_structure(zeros, spec)


def make_dataset(builder, split, *, batch_size, training, image_size=(1024, 1024),
                 max_instances=100, mask_crop_size=112, seed=0, shuffle=None, shuffle_buffer=1024,
                 num_epochs=None, keep_empty=None, process_index=None, process_count=None,
                 drop_remainder=None, transforms=None, resize="fit", min_size=800,
                 max_size=1333, scale_range=None, flip_prob=0.5, max_crowd_instances=20,
                 mask_dtype="float32", prefetch=2, num_parallel_calls=tf.data.AUTOTUNE,
                 start_batch=0, min_keypoints_per_image=0, keypoint_flip_permutation=None,
                 image_dtype="float32"):
  """Iterator of fixed-shape numpy batches (keys and shapes in the module docstring).

  Args:
    builder: a tfds builder from `prepare_coco_format`, or the path of a prepared dataset
      (`.../coco_format/<config>/<version>`).
    split: tfds split, e.g. 'train', 'validation', 'train[:1000]'.
    batch_size: per-host batch size B.
    training: shuffles, repeats forever (`num_epochs=None`), skips images without non-crowd
      objects, flips, jitters (if asked) and drops the last partial batch.
    image_size: padded (height, width).
    max_instances: M; objects beyond it are dropped (largest kept) and counted in num_dropped.
    mask_crop_size: S.
    seed: fixes file order, shuffling and every random transform (same seed, same batches).
    shuffle: default `training`.
    shuffle_buffer: examples held for shuffling (encoded, so cheap).
    num_epochs: None repeats forever (default in training), 1 in evaluation.
    keep_empty: keep images without non-crowd objects; default True in evaluation, False in
      training.
    process_index, process_count: this host's share, `tfds.even_splits(split, process_count)`;
      pass `jax.process_index()` and `jax.process_count()`. Defaults: 0 and 1.
    drop_remainder: default `training`. In evaluation the last batch is filled up (and every host
      gets the same number of batches) with zero examples whose `example_valid` is False.
    transforms: a list of `features -> features` functions replacing `default_transforms(...)`
      (resize, min_size, max_size, scale_range, flip_prob, max_crowd_instances, mask_dtype and
      image_dtype are passed to `default_transforms`).
    mask_dtype: 'float32' (soft [0, 1] crops) or 'uint8' (binarized at 0.5: 4x fewer bytes).
    image_dtype: 'float32' (normalized on the host) or 'uint8' (rounded, 4x fewer bytes; the
      model normalizes it on the device).
    prefetch: batches prepared ahead.
    num_parallel_calls: parallel map calls (AUTOTUNE by default).
    start_batch: batches to skip, e.g. the step a resumed training run starts at: the iterator then
      yields exactly the batches an uninterrupted run would have yielded from there on.
    min_keypoints_per_image: in training, when > 0, keep only images whose non-crowd objects have
      at least this many labelled (v > 0) keypoints in total and not only boxes with a side
      <= 1 pixel (torchvision's `_has_valid_annotation`; its COCO reference uses 10). 0 = off.
      Only for datasets with keypoints.
    keypoint_flip_permutation: K ints replacing the flip permutation derived from the keypoint
      names (`left_<s>` <-> `right_<s>`); None or () = derived. Datasets with keypoints only.
  """
  ds = build_dataset(
      builder, split, batch_size=batch_size, training=training, image_size=image_size,
      max_instances=max_instances, mask_crop_size=mask_crop_size, seed=seed, shuffle=shuffle,
      shuffle_buffer=shuffle_buffer, num_epochs=num_epochs, keep_empty=keep_empty,
      process_index=process_index, process_count=process_count, drop_remainder=drop_remainder,
      transforms=transforms, resize=resize, min_size=min_size, max_size=max_size,
      scale_range=scale_range, flip_prob=flip_prob, max_crowd_instances=max_crowd_instances,
      mask_dtype=mask_dtype, prefetch=prefetch, num_parallel_calls=num_parallel_calls,
      start_batch=start_batch, min_keypoints_per_image=min_keypoints_per_image,
      keypoint_flip_permutation=keypoint_flip_permutation, image_dtype=image_dtype)
  return iter(tfds.as_numpy(ds))


def make_train_dataset(builder, split="train", **kwargs):
  """`make_dataset(..., training=True)`."""
  return make_dataset(builder, split, training=True, **kwargs)


def make_eval_dataset(builder, split="validation", **kwargs):
  """`make_dataset(..., training=False)`."""
  return make_dataset(builder, split, training=False, **kwargs)
