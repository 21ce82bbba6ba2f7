"""`mask_head.train_buckets`: in training the mask head runs on the smallest slot bucket holding
every image's foreground RoIs, picked on the device; losses, gradients and batch statistics equal
the all-slots form's."""
import jax
import numpy as np

from configs import tiny
from maskrcnn_jax.modeling import build_model
from tests.conftest import quick_variables
from tests.ops.test_images import _uint8_batch


def _model(buckets, norm="none", mask_iou=False):
  cfg = tiny.get_config()
  cfg.model.mask_head.train_buckets = buckets
  cfg.model.mask_head.norm = norm
  if mask_iou:
    cfg.model.mask_iou_head.type = "standard"
    cfg.model.mask_iou_head.conv_layers = (8, 8)
    cfg.model.mask_iou_head.fc_layers = (16,)
  return build_model(cfg.model)


def test_bucketed_mask_head_equals_all_slots():
  """With batch-norm statistics in the mask head and the MaskIoU head reading its padded outputs
  (one compile pair for both)."""
  models = {b: _model(b, "bn", True) for b in ((), (4, 8, 16, 32, 64))}
  variables = quick_variables(models[()])
  batch = _uint8_batch()
  keys = jax.random.split(jax.random.key(0), 2)
  out = {}
  for buckets, model in models.items():
    def objective(params, model=model):
      losses, state = model.apply({**variables, "params": params}, batch, keys,
                                  method=model.losses, mutable=["batch_stats"])
      return model.objective(losses), (losses, state)
    step = jax.jit(jax.value_and_grad(objective, has_aux=True))
    (value, (losses, state)), grads = step(variables["params"])
    out[buckets] = value, losses, state, grads, step.lower(variables["params"]).as_text()
  full, bucketed = out[()], out[(4, 8, 16, 32, 64)]
  # The batch has few foreground RoIs per image, so a bucket below all 128 slots was taken.
  assert 0 < float(full[1]["num_fg_rois"]) < 64
  assert bucketed[4].count("stablehlo.case") > full[4].count("stablehlo.case")
  np.testing.assert_allclose(bucketed[0], full[0], rtol=1e-6)
  for k in full[1]:
    np.testing.assert_allclose(bucketed[1][k], full[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(bucketed[2]), jax.tree.leaves(full[2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(full[3])]
  for name, a, b in zip(names, jax.tree.leaves(bucketed[3]), jax.tree.leaves(full[3])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
