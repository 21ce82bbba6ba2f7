"""The composed Mask R-CNN (or Faster R-CNN with `mask_on=False`)."""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.resnet import ResNet
from maskrcnn_jax.modeling.roi_heads import BoxHead, MaskHead, Postprocess, RoIPooler
from maskrcnn_jax.modeling.rpn import RPN


class MaskRCNN(nn.Module):
  """ResNet-FPN, RPN, box head and (optionally) FCN mask head.

  Built from a config tree by `build_model`; each sub-module's fields are one config section.
  Parameter paths mirror torchvision's state_dict names (see `maskrcnn_jax.convert`).
  """
  num_classes: int
  """Classes including background (91 for COCO's category ids)."""
  backbone: ResNet
  fpn: FPN
  rpn: RPN
  roi_align: RoIPooler
  box_head: BoxHead
  mask_head: Optional[MaskHead]
  """None turns the model into Faster R-CNN."""
  postprocess: Postprocess

  def features(self, images, padded_sizes=None):
    """images: [B, H, W, 3] normalized, H and W multiples of 32; padded_sizes: [B, 2] int32 or None
    (see `layers.mask_to_extent`). Returns [P2..P6]."""
    return self.fpn(self.backbone(images, padded_sizes), padded_sizes)

  def __call__(self, images, image_sizes, padded_sizes) -> Dict[str, jnp.ndarray]:
    """Inference.

    Args:
      images: [B, Hc, Wc, 3] float32 normalized, zero-padded canvas (multiples of 32).
      image_sizes: [B, 2] int32 (h, w) of the resized image inside the canvas.
      padded_sizes: [B, 2] int32 (h, w) torchvision would pad each image to (round up to 32);
        equal to (Hc, Wc) for exact, torchvision-identical results.

    Returns:
      boxes [B, D, 4] (x1, y1, x2, y2) resized-image pixels, scores [B, D], labels [B, D] int32,
      valid [B, D] bool, and with masks masks [B, D, 28, 28] probabilities of the labelled class.
    """
    pyramid = self.features(images, padded_sizes)
    rpn_out = self.rpn(pyramid, image_sizes, padded_sizes, train=False)
    props, props_valid = rpn_out["proposals"], rpn_out["proposal_valid"]
    pooled = self.roi_align(pyramid[:4], props, self.roi_align.box_output_size, padded_sizes)
    logits, deltas = self.box_head(pooled)
    dets = jax.vmap(lambda *a: self.postprocess(*a, self.box_head.bbox_reg_weights))(
        logits, deltas, props, props_valid, image_sizes)
    dets["proposals"] = props
    dets["proposal_valid"] = props_valid
    if self.mask_head is not None:
      pooled = self.roi_align(pyramid[:4], dets["boxes"], self.roi_align.mask_output_size,
                              padded_sizes)
      b, d = pooled.shape[:2]
      mask_logits = self.mask_head(pooled.reshape((b * d,) + pooled.shape[2:]))
      mask_logits = mask_logits.reshape((b, d) + mask_logits.shape[1:])  # [B, D, 2S, 2S, K]
      picked = jnp.take_along_axis(mask_logits, dets["labels"][:, :, None, None, None], axis=-1)
      dets["masks"] = jax.nn.sigmoid(picked[..., 0])
    return dets
