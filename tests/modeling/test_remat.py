"""`backbone.remat`: the backbone's blocks recomputed in the backward pass; same variables, same
losses and gradients, a smaller training program."""
import jax
import numpy as np

from configs import tiny
from maskrcnn_jax.modeling import build_model
from maskrcnn_jax.modeling.mask_rcnn import init_variables
from tests.conftest import quick_variables
from tests.ops.test_images import _uint8_batch


def test_remat_keeps_variables_losses_and_gradients():
  models = {}
  for remat in (False, True):
    cfg = tiny.get_config()
    cfg.model.backbone.remat = remat
    models[remat] = build_model(cfg.model)
  variables = quick_variables(models[False])
  key = jax.random.key(0)
  shapes = [jax.eval_shape(lambda m=m: init_variables(m, key)) for m in models.values()]
  assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
  assert jax.tree.structure(shapes[1]) == jax.tree.structure(variables)
  batch = _uint8_batch()
  keys = jax.random.split(jax.random.key(0), 2)
  out = {}
  for remat, model in models.items():
    def objective(params, model=model):
      losses = model.apply({**variables, "params": params}, batch, keys, method=model.losses)
      return model.objective(losses), losses
    step = jax.jit(jax.value_and_grad(objective, has_aux=True))
    (value, losses), grads = step(variables["params"])
    hlo = step.lower(variables["params"]).as_text()
    out[remat] = value, losses, grads, hlo
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
  for k in out[False][1]:
    np.testing.assert_allclose(out[True][1][k], out[False][1][k], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(out[True][2]), jax.tree.leaves(out[False][2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The recomputation is in the program: more convolutions (the blocks' forward runs twice).
  assert out[True][3].count("stablehlo.convolution") > out[False][3].count("stablehlo.convolution")
