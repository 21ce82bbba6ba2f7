"""Device-side normalization of uint8 batches, and the losses it feeds."""
import jax
import numpy as np
import pytest

from maskrcnn_jax.ops.images import normalize_images

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _reference(images, sizes):
  """numpy float64: (x / 255 - mean) / std inside each image, 0 in its padding."""
  out = np.zeros(images.shape, np.float64)
  for b, (h, w) in enumerate(sizes):
    out[b, :h, :w] = (images[b, :h, :w] / 255.0 - MEAN) / STD
  return out


def test_statistics_equal_the_data_sides():
  from maskrcnn_jax.data import preprocess, transforms
  from maskrcnn_jax.ops import images
  assert images.IMAGE_MEAN == preprocess.IMAGE_MEAN == transforms.IMAGE_MEAN == tuple(MEAN)
  assert images.IMAGE_STD == preprocess.IMAGE_STD == transforms.IMAGE_STD == tuple(STD)


def test_normalize_images_equals_float64():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
  sizes = np.array([[32, 48], [20, 48], [7, 13]], np.int32)
  for b, (h, w) in enumerate(sizes):  # the pipeline's zero padding
    images[b, h:] = 0
    images[b, :, w:] = 0
  got = np.asarray(jax.jit(normalize_images)(images, sizes))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, _reference(images, sizes), atol=2e-6)
  with pytest.raises(ValueError, match="uint8"):
    normalize_images(images.astype(np.float32), sizes)


def test_losses_on_uint8_batch_equal_the_float_batch():
  """MaskRCNN.losses on a uint8 batch (normalized on the device) equals the losses on the same
  batch normalized on the host in float64 and sent as float32."""
  from configs import tiny
  from maskrcnn_jax.modeling import build_model
  from tests.conftest import quick_variables
  model = build_model(tiny.get_config().model)
  variables = quick_variables(model)
  batch = _uint8_batch()
  floats = dict(batch, image=_reference(batch["image"], batch["image_size"]).astype(np.float32))
  keys = jax.random.split(jax.random.key(0), 2)

  def losses(b):
    return jax.jit(lambda v, b: model.apply(v, b, keys, method=model.losses))(variables, b)

  got, want = losses(batch), losses(floats)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)


def _uint8_batch():
  """A tiny-config training batch (2 images of 128 px, the second 96 x 80) with uint8 images."""
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, 60, (2, 8, 2))
  yy, xx = np.mgrid[:28, :28] / 27 * 2 - 1
  batch = dict(image=rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8),
               image_size=np.array([[128, 128], [96, 80]], np.int32),
               gt_boxes=np.concatenate([xy, xy + rng.uniform(10, 40, (2, 8, 2))], -1)
               .astype(np.float32),
               gt_classes=rng.integers(1, 4, (2, 8)).astype(np.int32),
               gt_valid=np.ones((2, 8), bool),
               gt_masks=np.tile((xx ** 2 + yy ** 2 <= 1).astype(np.float32), (2, 8, 1, 1)))
  batch["image"][1, 96:] = 0
  batch["image"][1, :, 80:] = 0
  return batch
