"""`layers.Norm` against torch: BatchNorm2d in training (outputs, gradients, running statistics,
also over a subset of valid rows) and evaluation, FrozenBatchNorm2d, GroupNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling.layers import GROUPS, Norm
from tests.conftest import torch_or_skip

pytestmark = pytest.mark.reference


def _nchw(torch, x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _inputs(seed, n=6, c=64):
  rng = np.random.default_rng(seed)
  x = rng.normal(1.5, 2.0, (n, 5, 7, c)).astype(np.float32)
  weight = rng.uniform(0.5, 1.5, c).astype(np.float32)
  bias = rng.normal(0, 0.5, c).astype(np.float32)
  mean = rng.normal(0, 0.3, c).astype(np.float32)
  var = rng.uniform(0.5, 2.0, c).astype(np.float32)
  cot = rng.normal(0, 1, x.shape).astype(np.float32)
  return x, weight, bias, mean, var, cot


@pytest.mark.parametrize("masked", [False, True])
def test_batchnorm_training_equals_torch(masked):
  """Batch statistics over the valid rows, their gradients, and torch's running-statistics update
  (momentum 0.1, unbiased variance); invalid rows take no part."""
  torch, _ = torch_or_skip()
  x, weight, bias, mean, var, cot = _inputs(0)
  valid = np.array([True, False, True, True, False, True]) if masked else np.ones(6, bool)
  bn = torch.nn.BatchNorm2d(x.shape[-1], eps=1e-5, momentum=0.1)
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(weight))
    bn.bias.copy_(torch.from_numpy(bias))
    bn.running_mean.copy_(torch.from_numpy(mean))
    bn.running_var.copy_(torch.from_numpy(var))
  bn.train()
  xt = _nchw(torch, x[valid]).requires_grad_(True)
  yt = bn(xt)
  (yt * _nchw(torch, cot[valid])).sum().backward()

  norm = Norm("bn")
  variables = {"params": {"scale": jnp.asarray(weight), "bias": jnp.asarray(bias)},
               "batch_stats": {"running_mean": jnp.asarray(mean), "running_var": jnp.asarray(var)}}

  def f(params, x):
    y, upd = norm.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, True,
                        None, jnp.asarray(valid), mutable=["batch_stats"])
    return jnp.sum(jnp.where(jnp.asarray(valid)[:, None, None, None], y * cot, 0.0)), (y, upd)
  (_, (y, upd)), (g_params, g_x) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      variables["params"], jnp.asarray(x))
  tol = dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(y)[valid], yt.detach().numpy().transpose(0, 2, 3, 1), **tol)
  np.testing.assert_allclose(np.asarray(g_x)[valid], xt.grad.numpy().transpose(0, 2, 3, 1), **tol)
  assert np.all(np.asarray(g_x)[~valid] == 0)
  np.testing.assert_allclose(g_params["scale"], bn.weight.grad.numpy(), **tol)
  np.testing.assert_allclose(g_params["bias"], bn.bias.grad.numpy(), **tol)
  stats = upd["batch_stats"]
  np.testing.assert_allclose(stats["running_mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["running_var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bn", "bn_frozen_stats", "frozen_bn"])
def test_running_statistics_forms_equal_torch_eval(kind):
  """At inference (and in training for bn_frozen_stats / frozen_bn) every BatchNorm form is
  torch's eval-mode BatchNorm2d / FrozenBatchNorm2d, and the statistics stay as they are."""
  torch, torchvision = torch_or_skip()
  x, weight, bias, mean, var, _ = _inputs(1)
  ref = torchvision.ops.misc.FrozenBatchNorm2d(x.shape[-1], eps=1e-5)
  with torch.no_grad():
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", mean),
                    ("running_var", var)):
      getattr(ref, name).copy_(torch.from_numpy(v))
    expected = ref(_nchw(torch, x)).numpy().transpose(0, 2, 3, 1)
  stats = {"running_mean": jnp.asarray(mean), "running_var": jnp.asarray(var)}
  if kind == "frozen_bn":
    variables = {"batch_stats": dict(stats, weight=jnp.asarray(weight), bias=jnp.asarray(bias))}
  else:
    variables = {"params": {"scale": jnp.asarray(weight), "bias": jnp.asarray(bias)},
                 "batch_stats": stats}
  for train in ((False, True) if kind != "bn" else (False,)):
    y, upd = Norm(kind).apply(variables, jnp.asarray(x), train, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    assert jax.tree.all(jax.tree.map(np.array_equal, upd["batch_stats"],
                                     variables["batch_stats"]))


def test_groupnorm_equals_torch():
  torch, _ = torch_or_skip()
  x, weight, bias, _, _, _ = _inputs(2)
  ref = torch.nn.GroupNorm(GROUPS, x.shape[-1], eps=1e-5)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(weight))
    ref.bias.copy_(torch.from_numpy(bias))
    expected = ref(_nchw(torch, x)).numpy().transpose(0, 2, 3, 1)
  y = Norm("gn").apply({"params": {"scale": jnp.asarray(weight), "bias": jnp.asarray(bias)}},
                       jnp.asarray(x), True)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="divisible"):
    Norm("gn").init(jax.random.key(0), jnp.zeros((1, 2, 2, 20)))
