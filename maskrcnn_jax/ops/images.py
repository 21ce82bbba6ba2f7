"""Image normalization on the device, for batches sent as uint8 (`data.image_dtype='uint8'`)."""
import jax.numpy as jnp

from maskrcnn_jax.types import Array

# torchvision's ImageNet statistics for RGB in [0, 1]: the pipeline's (`data.transforms`) and
# inference's (`data.preprocess`); data/ may not import ops/ nor ops/ data/, so the three copies
# are kept equal by tests/ops/test_images.py.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def normalize_images(images: Array, image_sizes: Array) -> Array:
  """uint8 canvases -> what the host pipeline sends as float32: `(x / 255 - mean) / std` inside
  each image, 0 in its padding (the pipeline pads after normalizing).

  Computed as the pipeline's `transforms.normalize` computes it, `x * (1 / (255 std)) - mean / std`
  in float32, so a uint8 batch gives the model the same input as the float32 batch of the same
  rounded pixels.

  Args:
    images: [B, H, W, 3] uint8 RGB, the resized image at the top left of a zero canvas.
    image_sizes: [B, 2] int32 (h, w) of each resized image.

  Returns:
    [B, H, W, 3] float32.
  """
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3] uint8, got {images.shape} {images.dtype}")
  mul = jnp.asarray([1.0 / (255.0 * s) for s in IMAGE_STD], jnp.float32)
  add = jnp.asarray([-m / s for m, s in zip(IMAGE_MEAN, IMAGE_STD)], jnp.float32)
  x = images.astype(jnp.float32) * mul + add
  h, w = images.shape[1:3]
  sizes = jnp.asarray(image_sizes, jnp.int32)
  inside = ((jnp.arange(h)[None, :, None] < sizes[:, 0, None, None])
            & (jnp.arange(w)[None, None, :] < sizes[:, 1, None, None]))
  return jnp.where(inside[..., None], x, 0.0)
