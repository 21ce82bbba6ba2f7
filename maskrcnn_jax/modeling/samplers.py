"""Training target assignment: which anchors and RoIs each loss sees, as pure functions.

Three config sections, each a frozen dataclass whose fields are the section's keys and whose
`__call__` is a pure jnp function of one image (the detector maps it over the batch with one PRNG
key per example, so samples do not depend on how a batch is split over devices):

  rpn_sampler   `AnchorSampler`: anchors matched to ground truth (IoU 0.7 / 0.3 with low-quality
                matches) and a balanced sample of 256 (torchvision's RPN `Matcher` and
                `BalancedPositiveNegativeSampler`);
  roi_sampler   `RoISampler`: proposals plus the ground-truth boxes matched at 0.5 / 0.5 and a
                balanced sample of 512 at 25% foreground (torchvision's `RoIHeads`);
  mask_sampler  `ForegroundSampler`: the first `num_rois` foreground RoIs of the RoI sample, the
                RoIs the mask head (and any head after it that trains on foreground) learns from.

The RoI heads keep architecture fields only; their losses read these samples.
"""
import dataclasses
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.boxes import encode_boxes
from maskrcnn_jax.ops.matching import MatchLabel, crowd_overlap, match_boxes
from maskrcnn_jax.ops.sampling import sample_balanced, sample_indices
from maskrcnn_jax.types import Array


class GroundTruth(NamedTuple):
  """One image's (or, batched, every image's) ground truth in canvas pixels.

  boxes: [M, 4] float32 (x1, y1, x2, y2); classes: [M] int32 in 1..K-1; valid: [M] bool;
  crowd_boxes: [C, 4] float32 (x1, y1, x2, y2); crowd_valid: [C] bool.
  """
  boxes: Array
  classes: Array
  valid: Array
  crowd_boxes: Array
  crowd_valid: Array


class RoISamples(NamedTuple):
  """Sampled RoIs of one image (a leading batch axis when batched), positives first.

  rois: [R, 4] float32 (x1, y1, x2, y2) canvas pixels (no gradient);
  classes: [R] int32 ground-truth class of positives, 0 for background and empty slots;
  gt_index: [R] int32 matched ground truth (read on positives only);
  is_positive: [R] bool; valid: [R] bool (False on slots left empty when candidates run out).
  """
  rois: Array
  classes: Array
  gt_index: Array
  is_positive: Array
  valid: Array


def _check_thresholds(section: str, fg: float, bg: float, fraction: float, num: int) -> None:
  if not 0.0 <= bg <= fg <= 1.0:
    raise ValueError(f"{section}: need 0 <= bg_iou_threshold <= fg_iou_threshold <= 1, got "
                     f"{bg} and {fg}")
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"{section}.positive_fraction must be in [0, 1], got {fraction}")
  if num < 1:
    raise ValueError(f"{section}.batch_size_per_image must be >= 1, got {num}")


@dataclasses.dataclass(frozen=True)
class AnchorSampler:
  """`config.model.rpn_sampler`: the RPN's anchor labels and box targets."""
  fg_iou_threshold: float = 0.7
  """Anchors with IoU >= this are positive."""
  bg_iou_threshold: float = 0.3
  """Anchors with IoU < this are negative."""
  batch_size_per_image: int = 256
  """Anchors sampled per image for the loss."""
  positive_fraction: float = 0.5
  """Maximum fraction of positives among the sampled anchors."""
  crowd_ioa_threshold: float = 0.5
  """Negative anchors covered more than this by a crowd region are not sampled."""

  def __post_init__(self):
    _check_thresholds("rpn_sampler", self.fg_iou_threshold, self.bg_iou_threshold,
                      self.positive_fraction, self.batch_size_per_image)

  def __call__(self, key: Array, anchors: Array, anchor_valid: Array,
               gt: GroundTruth) -> Tuple[Array, Array, Array]:
    """One image.

    Args:
      key: PRNG key of this image.
      anchors: [A, 4] (x1, y1, x2, y2) canvas pixels; anchor_valid: [A] bool.
      gt: this image's `GroundTruth`.

    Returns:
      sampled_positive: [A] bool; sampled_negative: [A] bool;
      targets: [A, 4] float32 encoded (weights 1, 1, 1, 1) matched ground truth of positives, 0
        elsewhere.
    """
    matched, labels = match_boxes(anchors, gt.boxes, gt.valid, self.fg_iou_threshold,
                                  self.bg_iou_threshold, True)
    crowded = crowd_overlap(anchors, gt.crowd_boxes, gt.crowd_valid) > self.crowd_ioa_threshold
    positive = (labels == MatchLabel.POSITIVE) & anchor_valid
    negative = (labels == MatchLabel.NEGATIVE) & anchor_valid & ~crowded
    pos, neg = sample_balanced(key, positive, negative, self.batch_size_per_image,
                               self.positive_fraction)
    # Non-positives encode against themselves (target 0): a padding or empty ground truth would
    # give log(0) targets whose masked loss still has NaN gradients.
    target_boxes = jnp.where(positive[:, None], gt.boxes[matched], anchors)
    return pos, neg, encode_boxes(target_boxes, anchors)


@dataclasses.dataclass(frozen=True)
class RoISampler:
  """`config.model.roi_sampler`: the RoIs the box head (and the heads after it) train on."""
  fg_iou_threshold: float = 0.5
  """RoIs with IoU >= this are foreground."""
  bg_iou_threshold: float = 0.5
  """RoIs with IoU < this are background."""
  batch_size_per_image: int = 512
  """RoIs sampled per image."""
  positive_fraction: float = 0.25
  """Maximum foreground fraction of the sampled RoIs."""
  crowd_ioa_threshold: float = 0.5
  """Background RoIs covered more than this by a crowd region are not sampled."""
  add_gt_as_proposals: bool = True
  """The ground-truth boxes join the proposals as candidates (torchvision, Detectron2)."""

  def __post_init__(self):
    _check_thresholds("roi_sampler", self.fg_iou_threshold, self.bg_iou_threshold,
                      self.positive_fraction, self.batch_size_per_image)

  @property
  def max_positives(self) -> int:
    """The most foreground RoIs sampled per image."""
    return int(self.batch_size_per_image * self.positive_fraction)

  def __call__(self, key: Array, proposals: Array, proposal_valid: Array,
               gt: GroundTruth) -> RoISamples:
    """One image: proposals [P, 4] (x1, y1, x2, y2), proposal_valid [P] bool -> `RoISamples`
    with R = batch_size_per_image."""
    cands = jax.lax.stop_gradient(proposals)
    cands_valid = proposal_valid
    if self.add_gt_as_proposals:
      cands = jnp.concatenate([cands, gt.boxes], 0)
      cands_valid = jnp.concatenate([proposal_valid, gt.valid], 0)
    matched, labels = match_boxes(cands, gt.boxes, gt.valid, self.fg_iou_threshold,
                                  self.bg_iou_threshold, False)
    crowded = crowd_overlap(cands, gt.crowd_boxes, gt.crowd_valid) > self.crowd_ioa_threshold
    positive = (labels == MatchLabel.POSITIVE) & cands_valid
    negative = (labels == MatchLabel.NEGATIVE) & cands_valid & ~crowded
    idx, is_pos, ok = sample_indices(key, positive, negative, self.batch_size_per_image,
                                     self.positive_fraction)
    gt_index = matched[idx]
    classes = jnp.where(is_pos, gt.classes[gt_index], 0)
    return RoISamples(cands[idx], classes, gt_index, is_pos, ok)


@dataclasses.dataclass(frozen=True)
class ForegroundSampler:
  """`config.model.mask_sampler` (and `keypoint_sampler`): the foreground RoIs a head after the box
  head trains on."""
  num_rois: int = 128
  """Foreground RoIs per image that get targets. torchvision uses every foreground RoI, at most
  `roi_sampler.batch_size_per_image * positive_fraction` (128); fewer slots cost less (the
  first ones are kept: foreground proposals in the order of their objectness, then ground-truth
  boxes)."""

  def __post_init__(self):
    if not isinstance(self.num_rois, int) or isinstance(self.num_rois, bool) or self.num_rois < 1:
      raise ValueError(f"num_rois must be an int >= 1, got {self.num_rois!r}")

  def __call__(self, samples: RoISamples) -> RoISamples:
    """One image's RoI samples (positives first) -> the first `num_rois`, valid where they are
    foreground."""
    keep = lambda x: x[:self.num_rois]
    s = RoISamples(*map(keep, samples))
    return s._replace(valid=s.valid & s.is_positive)
