"""The keypoint head in a tiny model: built by one config switch, trained (its loss reaches its
parameters), predicting points inside their boxes, and refusing batches it cannot train on. Its
numbers against torchvision are tests/ops/test_keypoints.py's (targets, loss, decoding) and
tests/reference/test_keypointrcnn_vs_torchvision.py's (the whole model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from maskrcnn_jax.modeling.builder import build_model
from maskrcnn_jax.modeling.keypoint_head import KeypointHead
from tests.conftest import quick_variables
from tests.modeling.test_heads import _batch as heads_batch

K = 5


def _config(**head):
  c = tiny.get_config().model
  c.mask_on = False
  c.keypoint_head.update(dict(type="rcnn", num_keypoints=K, conv_layers=(16, 16)), **head)
  return c


@pytest.fixture(scope="module")
def tiny_model():
  model = build_model(_config())
  return model, quick_variables(model)


def _batch():
  b = heads_batch()
  n, m = b["gt_boxes"].shape[:2]
  rng = np.random.default_rng(1)
  kp = np.zeros((n, m, K, 3), np.float32)
  lo, hi = b["gt_boxes"][:, :, None, :2], b["gt_boxes"][:, :, None, 2:]
  kp[..., :2] = lo + rng.uniform(0, 1, (n, m, K, 2)) * (hi - lo)
  kp[..., 2] = rng.integers(0, 3, (n, m, K))
  kp[kp[..., 2] == 0] = 0.0
  b["gt_keypoints"] = np.where(b["gt_valid"][..., None, None], kp, 0.0).astype(np.float32)
  return b


def test_one_switch_builds_the_head(tiny_model):
  model, _ = tiny_model
  head = model.head("keypoint_head")
  assert isinstance(head, KeypointHead) and head.num_keypoints == K
  assert model.eval_tasks == ("bbox", "keypoints")
  assert model.point_keys == ("keypoints",)
  assert "gt_keypoints" in model.batch_keys and "gt_masks" not in model.batch_keys
  assert "loss_keypoint" in model.loss_names
  with pytest.raises(ValueError, match="num_keypoints"):
    build_model(_config(num_keypoints=0))


def _losses(model, variables, batch):
  keys = jax.random.split(jax.random.key(0), 2)

  def loss(head_params):
    params = dict(variables["params"], keypoint_head=head_params)
    losses, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                            {k: jnp.asarray(v) for k, v in batch.items()}, keys,
                            method=model.losses, mutable=["batch_stats"])
    return losses["loss_keypoint"], losses
  return jax.jit(jax.grad(loss, has_aux=True))(variables["params"]["keypoint_head"])


def test_model_trains_the_head(tiny_model):
  model, variables = tiny_model
  grads, losses = _losses(model, variables, _batch())
  assert set(model.loss_names) <= set(losses)
  assert all(np.isfinite(float(v)) for v in losses.values())
  # Cross-entropy over 16^2 cells (4 x the tiny 4 x 4 pooler) of a near-uniform initial heatmap.
  assert 0.5 * np.log(16 * 16) < float(losses["loss_keypoint"]) < 2 * np.log(16 * 16)
  g = traverse_util.flatten_dict(jax.device_get(grads))
  assert all(np.isfinite(v).all() for v in g.values())
  assert np.abs(g[("kps_score_lowres", "kernel")]).max() > 0
  assert np.abs(g[("kps_fcn1", "kernel")]).max() > 0


def test_batch_without_keypoints_is_refused(tiny_model):
  model, variables = tiny_model
  batch = _batch()
  del batch["gt_keypoints"]
  with pytest.raises(ValueError, match="gt_keypoints") as e:
    _losses(model, variables, batch)
  assert len(str(e.value).splitlines()) == 1
  batch = _batch()
  batch["gt_keypoints"] = batch["gt_keypoints"][:, :, :3]
  with pytest.raises(ValueError, match="num_keypoints=5") as e:
    _losses(model, variables, batch)
  assert len(str(e.value).splitlines()) == 1


def test_model_predicts_points_inside_their_boxes(tiny_model):
  model, variables = tiny_model
  images = jnp.asarray(_batch()["image"])
  sizes = jnp.array([[64, 64], [48, 56]], jnp.int32)
  out = jax.jit(lambda v: model.apply(v, images, sizes, jnp.full((2, 2), 64, jnp.int32)))(
      variables)
  out = jax.device_get(out)
  b, d = out["scores"].shape
  assert out["keypoints"].shape == (b, d, K, 3)
  assert out["keypoints_scores"].shape == (b, d, K)
  valid = out["valid"]
  assert valid.any()
  kp, boxes = out["keypoints"][valid], out["boxes"][valid]
  np.testing.assert_array_equal(kp[..., 2], 1.0)
  assert (kp[..., 0] >= boxes[:, None, 0]).all() and (kp[..., 0] <= boxes[:, None, 2] + 1).all()
  assert (kp[..., 1] >= boxes[:, None, 1]).all() and (kp[..., 1] <= boxes[:, None, 3] + 1).all()
  assert (out["keypoints"][~valid] == 0).all() and (out["keypoints_scores"][~valid] == 0).all()


def test_slot_bucket_equals_all_slots(tiny_model):
  """`keypoint_head.train_buckets` (the shared `roi_heads.loss_on_slot_bucket`): the head's loss and
  its gradients on the smallest bucket holding the foreground RoIs equal the all-slots form's."""
  model, variables = tiny_model
  full = build_model(_config(train_buckets=()))
  batch = _batch()
  (g_bucket, l_bucket), (g_full, l_full) = (_losses(m, variables, batch) for m in (model, full))
  assert 0 < float(l_full["num_fg_rois"]) < 32
  np.testing.assert_allclose(l_bucket["loss_keypoint"], l_full["loss_keypoint"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_bucket), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
