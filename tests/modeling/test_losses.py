"""Loss parity with torchvision: `rpn_loss`, `fastrcnn_loss`, `maskrcnn_loss`, `smooth_l1`.

Every comparison feeds both sides the same inputs (for the RPN, the same sampled anchors:
torchvision samples at random inside `compute_loss`, so its `fg_bg_sampler` is replaced by one
returning fixed masks) and asserts agreement within 1e-5. torchvision normalizes over the whole
batch, we per image; for one image they are the same function, and for images with equal sample
counts the batch value is the mean of ours (checked too).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling.losses import fastrcnn_loss, maskrcnn_loss, rpn_loss, smooth_l1
from tests.conftest import torch_or_skip

TOL = dict(rtol=1e-5, atol=1e-5)


def _t(torch, x):
  return torch.from_numpy(np.ascontiguousarray(x))


# ------------------------------------------------------------------------------------------------
# smooth L1


@pytest.mark.reference
@pytest.mark.parametrize("beta", [1.0 / 9, 1.0])
def test_smooth_l1_equals_torch(beta):
  torch, _ = torch_or_skip()
  import torch.nn.functional as F
  rng = np.random.default_rng(0)
  x = rng.normal(0, 2 * beta, 1000).astype(np.float32)
  x[:4] = [0.0, beta, -beta, np.nextafter(np.float32(beta), 0)]  # both sides of the kink
  ref = F.smooth_l1_loss(_t(torch, x), torch.zeros(1000), beta=beta, reduction="none").numpy()
  np.testing.assert_allclose(np.asarray(smooth_l1(jnp.asarray(x), beta)), ref, **TOL)


# ------------------------------------------------------------------------------------------------
# RPN


def _tv_rpn(torch, pos_masks, neg_masks):
  """A torchvision RegionProposalNetwork whose sampler returns the given per-image masks."""
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
  rpn = RegionProposalNetwork(AnchorGenerator(((32,),), ((1.0,),)), RPNHead(8, 1), 0.7, 0.3, 256,
                              0.5, dict(training=10, testing=10), dict(training=10, testing=10),
                              0.7)

  def fixed_sampler(labels):
    assert [len(l) for l in labels] == [len(m) for m in pos_masks]
    return ([_t(torch, m.astype(np.uint8)) for m in pos_masks],
            [_t(torch, m.astype(np.uint8)) for m in neg_masks])

  rpn.fg_bg_sampler = fixed_sampler
  return rpn


def _rpn_case(torch, seed, num_anchors, pos_rate, ignore_rate):
  """Random anchor labels sampled by torchvision's own sampler (seeded), logits, deltas, targets."""
  from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
  rng = np.random.default_rng(seed)
  u = rng.uniform(size=num_anchors)
  labels = np.where(u < pos_rate, 1.0, np.where(u < pos_rate + ignore_rate, -1.0, 0.0))
  labels = labels.astype(np.float32)
  torch.manual_seed(seed)
  pos, neg = BalancedPositiveNegativeSampler(256, 0.5)([_t(torch, labels)])
  pos, neg = pos[0].numpy().astype(bool), neg[0].numpy().astype(bool)
  logits = rng.normal(0, 3, num_anchors).astype(np.float32)
  deltas = rng.normal(0, 0.3, (num_anchors, 4)).astype(np.float32)
  targets = rng.normal(0, 0.3, (num_anchors, 4)).astype(np.float32)
  targets[~pos] = np.where(rng.uniform(size=((~pos).sum(), 4)) < 0.1, np.inf, 5.0)  # never read
  return labels, pos, neg, logits, deltas, targets


@pytest.mark.reference
@pytest.mark.parametrize("seed,pos_rate,ignore_rate", [
    (0, 0.05, 0.1),  # a few dozen positives
    (1, 0.5, 0.2),  # more positives than the 128 cap
    (2, 0.0, 0.3),  # background only: box loss 0
    (3, 0.0005, 0.0),  # a single positive
])
def test_rpn_loss_equals_compute_loss(seed, pos_rate, ignore_rate):
  torch, _ = torch_or_skip()
  labels, pos, neg, logits, deltas, targets = _rpn_case(torch, seed, 3000, pos_rate, ignore_rate)
  if seed == 3:
    assert pos.sum() >= 1
  rpn = _tv_rpn(torch, [pos], [neg])
  ref_obj, ref_box = rpn.compute_loss(_t(torch, logits[:, None]), _t(torch, deltas),
                                      [_t(torch, labels)], [_t(torch, targets)])
  obj, box = rpn_loss(jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(targets),
                      jnp.asarray(pos), jnp.asarray(neg))
  np.testing.assert_allclose(float(obj), ref_obj.item(), **TOL)
  np.testing.assert_allclose(float(box), ref_box.item(), **TOL)
  assert pos.sum() + neg.sum() == 256
  if pos_rate == 0:
    assert float(box) == 0.0 and ref_box.item() == 0.0


@pytest.mark.reference
def test_rpn_loss_batch_mean_equals_torchvision_batch():
  """Two images with 256 samples each: torchvision's batch loss is the mean of ours per image."""
  torch, _ = torch_or_skip()
  cases = [_rpn_case(torch, s, 2000, r, 0.1) for s, r in ((10, 0.03), (11, 0.2))]
  rpn = _tv_rpn(torch, [c[1] for c in cases], [c[2] for c in cases])
  cat = lambda i: np.concatenate([c[i] for c in cases])
  ref_obj, ref_box = rpn.compute_loss(_t(torch, cat(3)[:, None]), _t(torch, cat(4)),
                                      [_t(torch, c[0]) for c in cases],
                                      [_t(torch, c[5]) for c in cases])
  ours = [rpn_loss(*map(jnp.asarray, (c[3], c[4], c[5], c[1], c[2]))) for c in cases]
  np.testing.assert_allclose(np.mean([float(o[0]) for o in ours]), ref_obj.item(), **TOL)
  np.testing.assert_allclose(np.mean([float(o[1]) for o in ours]), ref_box.item(), **TOL)


# ------------------------------------------------------------------------------------------------
# Fast R-CNN


def _roi_case(seed, num_rois, num_classes, num_pos):
  rng = np.random.default_rng(seed)
  labels = np.zeros(num_rois, np.int64)
  labels[rng.choice(num_rois, num_pos, replace=False)] = rng.integers(1, num_classes, num_pos)
  logits = rng.normal(0, 2, (num_rois, num_classes)).astype(np.float32)
  deltas = rng.normal(0, 0.5, (num_rois, num_classes, 4)).astype(np.float32)
  targets = rng.normal(0, 0.5, (num_rois, 4)).astype(np.float32)
  return labels, logits, deltas, targets


@pytest.mark.reference
@pytest.mark.parametrize("seed,num_rois,num_classes,num_pos", [
    (0, 512, 91, 128),  # COCO-sized, full positive quota
    (1, 512, 91, 0),  # background only
    (2, 64, 4, 1),  # a single positive
    (3, 300, 200, 77),  # many classes
    (4, 1, 2, 1),  # one RoI
])
def test_fastrcnn_loss_equals_torchvision(seed, num_rois, num_classes, num_pos):
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import fastrcnn_loss as tv_fastrcnn_loss
  labels, logits, deltas, targets = _roi_case(seed, num_rois, num_classes, num_pos)
  ref_cls, ref_box = tv_fastrcnn_loss(_t(torch, logits),
                                      _t(torch, deltas.reshape(num_rois, -1)),
                                      [_t(torch, labels)], [_t(torch, targets)])
  cls, box = fastrcnn_loss(jnp.asarray(logits), jnp.asarray(deltas),
                           jnp.asarray(labels, jnp.int32), jnp.asarray(targets),
                           jnp.ones(num_rois, bool))
  np.testing.assert_allclose(float(cls), ref_cls.item(), **TOL)
  np.testing.assert_allclose(float(box), ref_box.item(), **TOL)
  if num_pos == 0:
    assert float(box) == 0.0 and ref_box.item() == 0.0
    assert np.isfinite(float(cls))


@pytest.mark.reference
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fastrcnn_loss_ignores_invalid_slots(seed):
  """Empty sampler slots (valid=False) hold garbage, even inf targets and positive labels: the loss
  equals torchvision's on the valid rows alone."""
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import fastrcnn_loss as tv_fastrcnn_loss
  labels, logits, deltas, targets = _roi_case(seed, 200, 11, 30)
  rng = np.random.default_rng(100 + seed)
  valid = rng.uniform(size=200) < 0.7
  ref_cls, ref_box = tv_fastrcnn_loss(_t(torch, logits[valid]),
                                      _t(torch, deltas[valid].reshape(valid.sum(), -1)),
                                      [_t(torch, labels[valid])], [_t(torch, targets[valid])])
  targets = targets.copy()
  targets[~valid] = np.inf
  logits = logits.copy()
  logits[~valid] = 1e30
  cls, box = fastrcnn_loss(jnp.asarray(logits), jnp.asarray(deltas),
                           jnp.asarray(labels, jnp.int32), jnp.asarray(targets), jnp.asarray(valid))
  np.testing.assert_allclose(float(cls), ref_cls.item(), **TOL)
  np.testing.assert_allclose(float(box), ref_box.item(), **TOL)


@pytest.mark.reference
def test_fastrcnn_loss_batch_equals_torchvision_batch():
  """Two images of 512 RoIs: torchvision's batch loss is the mean of our per-image ones."""
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import fastrcnn_loss as tv_fastrcnn_loss
  cases = [_roi_case(s, 512, 91, p) for s, p in ((20, 3), (21, 128))]
  ref_cls, ref_box = tv_fastrcnn_loss(
      _t(torch, np.concatenate([c[1] for c in cases])),
      _t(torch, np.concatenate([c[2].reshape(512, -1) for c in cases])),
      [_t(torch, c[0]) for c in cases], [_t(torch, c[3]) for c in cases])
  ours = [fastrcnn_loss(jnp.asarray(c[1]), jnp.asarray(c[2]), jnp.asarray(c[0], jnp.int32),
                        jnp.asarray(c[3]), jnp.ones(512, bool)) for c in cases]
  np.testing.assert_allclose(np.mean([float(o[0]) for o in ours]), ref_cls.item(), **TOL)
  np.testing.assert_allclose(np.mean([float(o[1]) for o in ours]), ref_box.item(), **TOL)


# ------------------------------------------------------------------------------------------------
# Mask R-CNN


def _mask_case(torch, seed, num_rois, num_classes, num_gt, size=28, hw=(60, 70)):
  """Full-image gt masks, RoIs near their boxes, logits; targets the torchvision way."""
  from torchvision.models.detection.roi_heads import project_masks_on_boxes
  rng = np.random.default_rng(seed)
  h, w = hw
  gt_masks = (rng.uniform(size=(num_gt, h, w)) < 0.4).astype(np.float32)
  gt_labels = rng.integers(1, num_classes, num_gt).astype(np.int64)
  matched = rng.integers(0, num_gt, num_rois).astype(np.int64)
  xy = rng.uniform(0, [w - 12, h - 12], (num_rois, 2))
  wh = rng.uniform(4, 30, (num_rois, 2))
  rois = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
  logits = rng.normal(0, 3, (num_rois, num_classes, size, size)).astype(np.float32)
  targets = project_masks_on_boxes(_t(torch, gt_masks), _t(torch, rois), _t(torch, matched),
                                   size).numpy()
  return gt_masks, gt_labels, matched, rois, logits, targets


@pytest.mark.reference
@pytest.mark.parametrize("seed,num_rois,num_classes", [(0, 37, 91), (1, 1, 2), (2, 128, 4),
                                                       (3, 16, 250)])
def test_maskrcnn_loss_equals_torchvision(seed, num_rois, num_classes):
  """torchvision's `maskrcnn_loss` (which projects full-image masks itself) vs ours given the
  targets torchvision projects: the whole loss, not just the BCE."""
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss
  gt_masks, gt_labels, matched, rois, logits, targets = _mask_case(torch, seed, num_rois,
                                                                   num_classes, 5)
  ref = tv_maskrcnn_loss(_t(torch, logits), [_t(torch, rois)], [_t(torch, gt_masks)],
                         [_t(torch, gt_labels)], [_t(torch, matched)]).item()
  ours = maskrcnn_loss(jnp.asarray(logits.transpose(0, 2, 3, 1)),
                       jnp.asarray(gt_labels[matched], jnp.int32), jnp.asarray(targets),
                       jnp.ones(num_rois, bool))
  np.testing.assert_allclose(float(ours), ref, **TOL)
  assert 0.0 < targets.mean() < 1.0  # the targets are not trivial


@pytest.mark.reference
@pytest.mark.parametrize("seed", [0, 1])
def test_maskrcnn_loss_ignores_invalid_slots(seed):
  """Slots past the sampled positives (valid=False) carry other classes and garbage targets."""
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss
  gt_masks, gt_labels, matched, rois, logits, targets = _mask_case(torch, 10 + seed, 40, 91, 4)
  valid = np.random.default_rng(seed).uniform(size=40) < 0.5
  ref = tv_maskrcnn_loss(_t(torch, logits[valid]), [_t(torch, rois[valid])],
                         [_t(torch, gt_masks)], [_t(torch, gt_labels)],
                         [_t(torch, matched[valid])]).item()
  targets = targets.copy()
  targets[~valid] = 7.0
  ours = maskrcnn_loss(jnp.asarray(logits.transpose(0, 2, 3, 1)),
                       jnp.asarray(gt_labels[matched], jnp.int32), jnp.asarray(targets),
                       jnp.asarray(valid))
  np.testing.assert_allclose(float(ours), ref, **TOL)


# ------------------------------------------------------------------------------------------------
# No objects


@pytest.mark.reference
def test_no_objects_losses_finite_and_zero():
  """An image without objects: nothing positive is sampled. torchvision gives box losses 0 and a
  mask loss of `mask_logits.sum() * 0`; ours must give exactly 0 too, and finite classification
  losses."""
  torch, _ = torch_or_skip()
  from torchvision.models.detection.roi_heads import (
      fastrcnn_loss as tv_fastrcnn_loss,
      maskrcnn_loss as tv_maskrcnn_loss,
  )
  rng = np.random.default_rng(7)
  # RPN: every anchor negative (torchvision's labels when there is no ground truth).
  a = 1000
  labels = np.zeros(a, np.float32)
  neg = np.zeros(a, bool)
  neg[rng.choice(a, 256, replace=False)] = True
  pos = np.zeros(a, bool)
  logits = rng.normal(0, 2, a).astype(np.float32)
  deltas = rng.normal(0, 1, (a, 4)).astype(np.float32)
  targets = np.full((a, 4), -np.inf, np.float32)  # encoding a zero-size padding box
  rpn = _tv_rpn(torch, [pos], [neg])
  ref_obj, ref_box = rpn.compute_loss(_t(torch, logits[:, None]), _t(torch, deltas),
                                      [_t(torch, labels)],
                                      [_t(torch, np.zeros((a, 4), np.float32))])
  obj, box = rpn_loss(*map(jnp.asarray, (logits, deltas, targets, pos, neg)))
  np.testing.assert_allclose(float(obj), ref_obj.item(), **TOL)
  assert float(box) == 0.0 == ref_box.item()
  # Box head: all background.
  roi_labels, roi_logits, roi_deltas, roi_targets = _roi_case(8, 512, 91, 0)
  ref_cls, ref_box = tv_fastrcnn_loss(_t(torch, roi_logits),
                                      _t(torch, roi_deltas.reshape(512, -1)),
                                      [_t(torch, roi_labels)], [_t(torch, roi_targets)])
  cls, box = fastrcnn_loss(jnp.asarray(roi_logits), jnp.asarray(roi_deltas),
                           jnp.asarray(roi_labels, jnp.int32),
                           jnp.full((512, 4), -np.inf, jnp.float32), jnp.ones(512, bool))
  np.testing.assert_allclose(float(cls), ref_cls.item(), **TOL)
  assert np.isfinite(float(cls))
  assert float(box) == 0.0 == ref_box.item()
  # Mask head: no positive RoI (ours has fixed slots, all invalid).
  ref_mask = tv_maskrcnn_loss(torch.randn(0, 91, 28, 28), [torch.zeros(0, 4)],
                              [torch.zeros(0, 50, 50)], [torch.zeros(0, dtype=torch.int64)],
                              [torch.zeros(0, dtype=torch.int64)]).item()
  mask = maskrcnn_loss(jnp.asarray(rng.normal(0, 3, (128, 28, 28, 91)), jnp.float32),
                       jnp.zeros(128, jnp.int32), jnp.zeros((128, 28, 28)), jnp.zeros(128, bool))
  assert float(mask) == 0.0 == ref_mask


def test_gradients_finite_when_unread_targets_are_inf():
  """Targets of rows the loss does not read may be inf (log(0) of an empty box): no NaN grads."""
  import jax
  rng = np.random.default_rng(0)
  pos = np.zeros(50, bool)
  pos[:5] = True
  neg = ~pos
  targets = rng.normal(0, 0.3, (50, 4)).astype(np.float32)
  targets[5:, 2:] = -np.inf  # what encode_boxes gives for a zero-size matched box
  g_rpn = jax.grad(lambda d: rpn_loss(jnp.zeros(50), d, jnp.asarray(targets), jnp.asarray(pos),
                                      jnp.asarray(neg))[1])(jnp.zeros((50, 4)))
  labels = np.where(pos, 1, 0).astype(np.int32)
  g_roi = jax.grad(lambda d: fastrcnn_loss(jnp.zeros((50, 3)), d, jnp.asarray(labels),
                                           jnp.asarray(targets), jnp.ones(50, bool))[1])(
                                               jnp.zeros((50, 3, 4)))
  assert np.isfinite(np.asarray(g_rpn)).all() and np.isfinite(np.asarray(g_roi)).all()
