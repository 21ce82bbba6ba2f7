"""Matching and balanced sampling against float64 numpy references and torchvision's `Matcher` and
`BalancedPositiveNegativeSampler` (where those are deterministic: the match, the sample counts)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.anchors import cell_anchors, multilevel_anchors
from maskrcnn_jax.ops.matching import MatchLabel, crowd_overlap, match_boxes
from maskrcnn_jax.ops.sampling import sample_balanced, sample_indices
from tests.conftest import torch_or_skip
from tests.reference.tv_models import box_iou


def _random_boxes(rng, n, size=200.0, min_wh=2.0, max_wh=100.0):
  xy = rng.uniform(-10, size, (n, 2))
  wh = rng.uniform(min_wh, max_wh, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _jitter(rng, boxes, scale):
  """Boxes near `boxes`: corners moved by up to `scale` of the box size."""
  wh = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, 1)
  out = boxes + rng.uniform(-scale, scale, boxes.shape) * wh
  out = np.concatenate([np.minimum(out[:, :2], out[:, 2:] - 0.5), out[:, 2:]], 1)
  return out.astype(np.float32)


def _np_match(boxes, gt, gt_valid, high, low, allow_low_quality):
  """float64 numpy reference of the documented rule (torchvision's Matcher; ground truths whose best
  IoU is 0 take no part in low-quality matching). Returns (matched, labels) over valid gts only."""
  iou = box_iou(gt[gt_valid], boxes)  # [Mv, A] float64
  idx = np.nonzero(gt_valid)[0]
  if iou.shape[0] == 0:
    return np.zeros(len(boxes), np.int64), np.full(len(boxes), int(MatchLabel.NEGATIVE))
  best = iou.max(0)
  matched = idx[iou.argmax(0)]
  labels = np.where(best >= high, int(MatchLabel.POSITIVE),
                    np.where(best < low, int(MatchLabel.NEGATIVE), int(MatchLabel.IGNORE)))
  if allow_low_quality:
    best_gt = iou.max(1, keepdims=True)
    ties = (iou == best_gt) & (best_gt > 0)
    labels = np.where(ties.any(0), int(MatchLabel.POSITIVE), labels)
  return matched, labels


def _tv_to_ours(tv_matched):
  """torchvision's Matcher output (index >= 0, -1 below low, -2 between) -> (matched, labels)."""
  labels = np.where(tv_matched >= 0, int(MatchLabel.POSITIVE),
                    np.where(tv_matched == -1, int(MatchLabel.NEGATIVE), int(MatchLabel.IGNORE)))
  return tv_matched, labels


def _case(seed, num_anchors=600, num_gt=12):
  rng = np.random.default_rng(seed)
  gt = _random_boxes(rng, num_gt)
  anchors = np.concatenate([_random_boxes(rng, num_anchors - 4 * num_gt),
                            _jitter(rng, np.repeat(gt, 4, 0), 0.25)])  # some near each gt
  return rng, anchors, gt


@pytest.mark.reference
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("high,low,low_quality", [(0.7, 0.3, True), (0.5, 0.5, False)])
def test_match_equals_torchvision_matcher(seed, high, low, low_quality):
  torch, _ = torch_or_skip()
  from torchvision.models.detection._utils import Matcher
  from torchvision.ops import box_iou as tv_box_iou
  _, anchors, gt = _case(seed)
  tv = Matcher(high, low, allow_low_quality_matches=low_quality)(
      tv_box_iou(torch.from_numpy(gt), torch.from_numpy(anchors))).numpy()
  ref_matched, ref_labels = _tv_to_ours(tv)
  matched, labels = match_boxes(jnp.asarray(anchors), jnp.asarray(gt), jnp.ones(len(gt), bool),
                                high, low, low_quality)
  matched, labels = np.asarray(matched), np.asarray(labels)
  np.testing.assert_array_equal(labels, ref_labels)
  pos = labels == MatchLabel.POSITIVE
  np.testing.assert_array_equal(matched[pos], ref_matched[pos])
  # The float64 reference agrees too, and the low-quality rule did something.
  np_matched, np_labels = _np_match(anchors, gt, np.ones(len(gt), bool), high, low, low_quality)
  np.testing.assert_array_equal(labels, np_labels)
  np.testing.assert_array_equal(matched, np_matched)
  if low_quality:
    iou = box_iou(gt, anchors)
    assert (pos & (iou.max(0) < high)).any()
  assert pos.any() and (labels == MatchLabel.NEGATIVE).any()
  assert (labels == MatchLabel.IGNORE).any() == (low < high)  # no ignore band when high == low


@pytest.mark.reference
@pytest.mark.parametrize("seed", range(3))
def test_match_anchor_grid_equals_torchvision_matcher(seed):
  """Real anchors (a regular grid: many equal IoUs) and integer gt boxes, the RPN setting."""
  torch, _ = torch_or_skip()
  from torchvision.models.detection._utils import Matcher
  from torchvision.ops import box_iou as tv_box_iou
  sizes = ((16,), (32,), (64,), (128,), (256,))
  cells = [cell_anchors(s, (0.5, 1.0, 2.0)) for s in sizes]
  grids = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
  anchors, _ = multilevel_anchors(grids, (2, 3, 4, 5, 6), (128, 128), cells)
  anchors = np.array(anchors)
  rng = np.random.default_rng(seed)
  xy = rng.integers(0, 100, (8, 2))
  gt = np.concatenate([xy, np.minimum(xy + rng.integers(4, 64, (8, 2)), 128)], 1).astype(np.float32)
  tv = Matcher(0.7, 0.3, allow_low_quality_matches=True)(
      tv_box_iou(torch.from_numpy(gt), torch.from_numpy(anchors))).numpy()
  ref_matched, ref_labels = _tv_to_ours(tv)
  matched, labels = map(np.asarray, match_boxes(jnp.asarray(anchors), jnp.asarray(gt),
                                                jnp.ones(8, bool), 0.7, 0.3, True))
  np.testing.assert_array_equal(labels, ref_labels)
  pos = labels == MatchLabel.POSITIVE
  np.testing.assert_array_equal(matched[pos], ref_matched[pos])


@pytest.mark.parametrize("seed", range(3))
def test_padding_gt_rows_never_match(seed):
  """Padding rows (gt_valid False) may hold anything, even copies of anchors: never matched, and
  the result equals matching against the valid rows alone."""
  rng, anchors, gt = _case(seed)
  valid = np.ones(len(gt), bool)
  valid[rng.choice(len(gt), 5, replace=False)] = False
  gt = gt.copy()
  gt[np.nonzero(~valid)[0][:2]] = anchors[:2]  # exact copies: IoU 1 if they were read
  gt[np.nonzero(~valid)[0][2]] = 0.0  # the zero padding rows of the pipeline
  for high, low, lq in [(0.7, 0.3, True), (0.5, 0.5, False)]:
    matched, labels = map(np.asarray, match_boxes(jnp.asarray(anchors), jnp.asarray(gt),
                                                  jnp.asarray(valid), high, low, lq))
    assert valid[matched].all()
    np_matched, np_labels = _np_match(anchors, gt, valid, high, low, lq)
    np.testing.assert_array_equal(labels, np_labels)
    np.testing.assert_array_equal(matched, np_matched)


@pytest.mark.parametrize("lq", [True, False])
def test_no_valid_gt_all_negative(lq):
  rng = np.random.default_rng(0)
  anchors = _random_boxes(rng, 300)
  gt = anchors[:5].copy()  # would match with IoU 1, but every row is padding
  matched, labels = match_boxes(jnp.asarray(anchors), jnp.asarray(gt), jnp.zeros(5, bool),
                                0.7, 0.3, lq)
  assert (np.asarray(labels) == MatchLabel.NEGATIVE).all()
  assert (np.asarray(matched) >= 0).all() and (np.asarray(matched) < 5).all()


def test_low_quality_skips_gt_that_overlaps_nothing():
  """A gt that overlaps no anchor does not turn zero-IoU anchors positive (our documented rule;
  torchvision's Matcher would make every such anchor positive), while a gt that overlaps anchors
  only weakly gets its best anchors."""
  anchors = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], np.float32)
  gt = np.array([[100, 100, 110, 110], [8, 8, 18, 18]], np.float32)
  matched, labels = map(np.asarray, match_boxes(jnp.asarray(anchors), jnp.asarray(gt),
                                                jnp.ones(2, bool), 0.7, 0.3, True))
  np_matched, np_labels = _np_match(anchors, gt, np.ones(2, bool), 0.7, 0.3, True)
  np.testing.assert_array_equal(labels, np_labels)
  np.testing.assert_array_equal(labels, [MatchLabel.POSITIVE, MatchLabel.NEGATIVE,
                                         MatchLabel.NEGATIVE])
  assert matched[0] == 1


@pytest.mark.parametrize("seed", range(3))
def test_crowd_overlap_equals_float64(seed):
  rng = np.random.default_rng(seed)
  boxes = _random_boxes(rng, 400)
  boxes[0] = [5, 5, 5, 20]  # zero area: 0
  crowd = _random_boxes(rng, 6, max_wh=150)
  valid = np.array([True, True, False, True, False, True])
  crowd[2] = boxes[1]  # an invalid row covering box 1 entirely must not count
  b, c = boxes.astype(np.float64), crowd[valid].astype(np.float64)
  lt = np.maximum(b[:, None, :2], c[None, :, :2])
  rb = np.minimum(b[:, None, 2:], c[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = np.prod(b[:, 2:] - b[:, :2], -1)
  ref = np.where(area[:, None] > 0, inter / np.where(area > 0, area, 1)[:, None], 0).max(1)
  ours = np.asarray(crowd_overlap(jnp.asarray(boxes), jnp.asarray(crowd), jnp.asarray(valid)))
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  assert ours[0] == 0.0
  assert ((ours >= 0) & (ours <= 1 + 1e-6)).all() and (ours > 0.99).any() and (ours == 0).any()
  assert (np.asarray(crowd_overlap(jnp.asarray(boxes), jnp.asarray(crowd),
                                   jnp.zeros(6, bool))) == 0).all()
  assert (np.asarray(crowd_overlap(jnp.asarray(boxes), jnp.zeros((0, 4)),
                                   jnp.zeros(0, bool))) == 0).all()


# ------------------------------------------------------------------------------------------------
# Sampling


def _labels(rng, n, num_pos, num_neg):
  """Disjoint positive / negative candidate masks of the given sizes (the rest ignored)."""
  perm = rng.permutation(n)
  pos = np.zeros(n, bool)
  neg = np.zeros(n, bool)
  pos[perm[:num_pos]] = True
  neg[perm[num_pos:num_pos + num_neg]] = True
  return pos, neg


@pytest.mark.reference
@pytest.mark.parametrize("num_samples,fraction", [(256, 0.5), (512, 0.25)])
@pytest.mark.parametrize("num_pos,num_neg", [(0, 3000), (3, 3000), (1000, 3000), (1000, 10),
                                             (0, 0), (7, 20), (128, 384), (600, 0)])
def test_sample_balanced_counts_equal_torchvision(num_samples, fraction, num_pos, num_neg):
  torch, _ = torch_or_skip()
  from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
  n = 4000
  rng = np.random.default_rng(num_pos * 7 + num_neg)
  pos, neg = _labels(rng, n, num_pos, num_neg)
  tv_labels = np.where(pos, 1, np.where(neg, 0, -1)).astype(np.int64)
  torch.manual_seed(0)
  sampler = BalancedPositiveNegativeSampler(num_samples, fraction)
  tv_pos, tv_neg = sampler([torch.from_numpy(tv_labels)])
  sp, sn = map(np.asarray, sample_balanced(jax.random.key(num_pos), jnp.asarray(pos),
                                           jnp.asarray(neg), num_samples, fraction))
  want_pos = min(num_pos, int(num_samples * fraction))
  assert sp.sum() == want_pos == int(tv_pos[0].sum())
  assert sn.sum() == min(num_neg, num_samples - want_pos) == int(tv_neg[0].sum())
  assert sp.sum() + sn.sum() == min(num_samples, want_pos + num_neg)
  assert not (sp & ~pos).any() and not (sn & ~neg).any()  # subsets of the candidates


def test_sample_balanced_keys_differ():
  rng = np.random.default_rng(0)
  pos, neg = _labels(rng, 2000, 300, 1500)
  samples = [tuple(map(np.asarray, sample_balanced(jax.random.key(k), jnp.asarray(pos),
                                                   jnp.asarray(neg), 256, 0.5)))
             for k in range(4)]
  for i in range(4):
    for j in range(i + 1, 4):
      assert (samples[i][0] != samples[j][0]).any() and (samples[i][1] != samples[j][1]).any()
  again = tuple(map(np.asarray, sample_balanced(jax.random.key(0), jnp.asarray(pos),
                                                jnp.asarray(neg), 256, 0.5)))
  np.testing.assert_array_equal(again[0], samples[0][0])  # same key, same sample
  np.testing.assert_array_equal(again[1], samples[0][1])


def test_sample_balanced_uniform():
  """Each of 20 positives (cap 5 of 10) and each of 30 negatives (the other 5 slots) is picked with
  equal probability: chi-square of the pick counts over 4000 keys stays below the 1e-4 tails of
  chi2(19) (~49) and chi2(29) (~64)."""
  pos, neg = np.zeros(60, bool), np.zeros(60, bool)
  pos[5:25] = True
  neg[28:58] = True
  keys = jax.random.split(jax.random.key(1), 4000)
  sp, sn = jax.vmap(lambda k: sample_balanced(k, jnp.asarray(pos), jnp.asarray(neg), 10, 0.5))(keys)
  sp, sn = np.asarray(sp), np.asarray(sn)
  assert (sp.sum(1) == 5).all() and (sn.sum(1) == 5).all()
  for counts, n_cand in ((sp.sum(0)[pos], 20), (sn.sum(0)[neg], 30)):
    expected = 4000 * 5 / n_cand
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < (49.0 if n_cand == 20 else 64.0), (chi2, counts)
  # Whole sets are uniform too: 4000 draws from C(20, 5) = 15504 equally likely sets give
  # 15504 (1 - exp(-4000 / 15504)) ~ 3526 distinct ones (sd ~ 18; measured 3503).
  expected_sets = 15504 * (1 - np.exp(-4000 / 15504))
  assert abs(len({tuple(np.nonzero(r)[0]) for r in sp}) - expected_sets) < 100


@pytest.mark.parametrize("num_pos,num_neg,num_samples", [(50, 1000, 512), (300, 1000, 512),
                                                         (3, 5, 16), (0, 0, 8), (2, 0, 8)])
def test_sample_indices_positives_first_and_padding(num_pos, num_neg, num_samples):
  n = 2000 if num_neg >= 1000 else 40
  rng = np.random.default_rng(num_pos)
  pos, neg = _labels(rng, n, num_pos, num_neg)
  key = jax.random.key(3)
  sp, sn = map(np.asarray, sample_balanced(key, jnp.asarray(pos), jnp.asarray(neg), num_samples,
                                           0.25))
  idx, is_pos, valid = map(np.asarray, sample_indices(key, jnp.asarray(pos), jnp.asarray(neg),
                                                      num_samples, 0.25))
  assert idx.shape == is_pos.shape == valid.shape == (num_samples,)
  k_pos, k = int(sp.sum()), int(sp.sum() + sn.sum())
  assert k_pos == min(num_pos, int(num_samples * 0.25))
  assert k == min(num_samples, k_pos + num_neg)
  np.testing.assert_array_equal(is_pos, np.arange(num_samples) < k_pos)  # positives first
  np.testing.assert_array_equal(valid, np.arange(num_samples) < k)  # then negatives, then padding
  np.testing.assert_array_equal(np.sort(idx[:k_pos]), np.nonzero(sp)[0])  # the same sets
  np.testing.assert_array_equal(np.sort(idx[k_pos:k]), np.nonzero(sn)[0])
  assert ((idx >= 0) & (idx < n)).all()


def test_sample_indices_fewer_candidates_than_samples():
  """A candidate list shorter than num_samples: slots past it are padded with valid=False."""
  pos = np.array([True, False, False, True, False, False])
  neg = np.array([False, True, True, False, False, True])
  idx, is_pos, valid = map(np.asarray, sample_indices(jax.random.key(0), jnp.asarray(pos),
                                                      jnp.asarray(neg), 10, 0.5))
  assert idx.shape == (10,)
  np.testing.assert_array_equal(valid, [True] * 5 + [False] * 5)
  np.testing.assert_array_equal(is_pos, [True] * 2 + [False] * 8)
  assert set(idx[:2]) == {0, 3} and set(idx[2:5]) == {1, 2, 5}


@pytest.mark.parametrize("num_pos,num_neg,num_samples", [(50, 1000, 512), (300, 1000, 512),
                                                         (3, 5, 16), (0, 0, 8), (600, 0, 256)])
def test_sample_balanced_is_the_random_order_definition(num_pos, num_neg, num_samples):
  """The samples are exactly the first candidates in the order of the key's uniforms (a numpy
  stable sort of the same draws: the definition the top-k threshold implements, ties included)."""
  n = 2000 if num_neg >= 1000 else 600
  rng = np.random.default_rng(num_pos + 1)
  pos, neg = _labels(rng, n, num_pos, num_neg)
  for seed in range(3):
    key = jax.random.key(seed)
    sp, sn = map(np.asarray, sample_balanced(key, jnp.asarray(pos), jnp.asarray(neg),
                                             num_samples, 0.25))
    kp, kn = jax.random.split(key)

    def first(k, mask, count):
      u = np.where(mask, np.asarray(jax.random.uniform(k, (n,))), 2.0)
      chosen = np.zeros(n, bool)
      chosen[np.argsort(u, kind="stable")[:max(count, 0)]] = True
      return chosen & mask
    want_pos = first(kp, pos, int(num_samples * 0.25))
    want_neg = first(kn, neg, num_samples - int(want_pos.sum()))
    np.testing.assert_array_equal(sp, want_pos)
    np.testing.assert_array_equal(sn, want_neg)


def test_sample_balanced_tied_keys_break_by_index(monkeypatch):
  """Equal random keys (here all of them) are taken in index order, as a stable sort takes them."""
  monkeypatch.setattr(jax.random, "uniform", lambda key, shape: jnp.full(shape, 0.5))
  pos = np.zeros(40, bool)
  pos[[3, 9, 11, 20, 33]] = True
  neg = ~pos
  sp, sn = map(np.asarray, sample_balanced(jax.random.key(0), jnp.asarray(pos), jnp.asarray(neg),
                                           8, 0.5))
  np.testing.assert_array_equal(np.nonzero(sp)[0], [3, 9, 11, 20])
  np.testing.assert_array_equal(np.nonzero(sn)[0], [0, 1, 2, 4])
