"""The optimizer against torch.optim.SGD (an independent reference), frozen parts, decay mask,
schedules."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from maskrcnn_jax.training import optimizer as opt
from tests.conftest import torch_or_skip


def _training(**kw):
  t = dict(steps=100, learning_rate=0.1, momentum=0.9, weight_decay=1e-2,
           weight_decay_norm_and_bias=False, schedule="step", decay_steps=(6, 8), decay_factor=0.1,
           warmup_steps=4, warmup_factor=0.25, clip_grad_norm=0.0, frozen_stages=1)
  t.update(kw)
  return ml_collections.ConfigDict(t)


def _params(rng):
  """A tree with the backbone's naming: stem, layer1 (frozen at frozen_stages=1), layer2, heads."""
  shapes = {
      ("backbone", "conv1", "kernel"): (3, 3, 3, 4),
      ("backbone", "layer1_0", "conv1", "kernel"): (1, 1, 4, 4),
      ("backbone", "layer1_1", "conv1", "kernel"): (1, 1, 4, 4),
      ("backbone", "layer2_0", "conv1", "kernel"): (1, 1, 4, 8),
      ("backbone", "layer2_0", "conv2", "kernel"): (3, 3, 8, 8),
      ("fpn", "inner_blocks_0", "kernel"): (1, 1, 8, 6),
      ("fpn", "inner_blocks_0", "bias"): (6,),
      ("box_head", "fc6", "kernel"): (6, 5),
      ("box_head", "fc6", "bias"): (5,),
  }
  flat = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  return traverse_util.unflatten_dict(flat)


def test_schedule_step_values():
  lr = opt.learning_rate_schedule(_training())
  got = [float(lr(t)) for t in range(10)]
  # warm-up 0.25 -> 1 over 4 updates (torch LinearLR), then x0.1 at 6 and at 8 (MultiStepLR).
  want = [0.1 * (0.25 + 0.75 * t / 4) for t in range(4)] + [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_schedule_cosine_values():
  lr = opt.learning_rate_schedule(_training(schedule="cosine", steps=14, min_lr_factor=0.1))
  np.testing.assert_allclose(float(lr(0)), 0.025, rtol=1e-6)
  np.testing.assert_allclose(float(lr(4)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(lr(9)), 0.1 * (0.1 + 0.9 * 0.5), rtol=1e-6)  # halfway
  np.testing.assert_allclose(float(lr(14)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 0.01, rtol=1e-6)


def test_schedule_unknown_is_an_error():
  with pytest.raises(ValueError, match="training.schedule"):
    opt.learning_rate_schedule(_training(schedule="linear"))


def test_frozen_labels_follow_torchvision_trainable_layers():
  params = _params(np.random.default_rng(0))
  frozen = lambda k: {"/".join(p) for p, v in traverse_util.flatten_dict(
      opt.trainable_labels(params, k)).items() if v == opt.FROZEN}
  assert frozen(0) == set()
  assert frozen(1) == {"backbone/conv1/kernel", "backbone/layer1_0/conv1/kernel",
                       "backbone/layer1_1/conv1/kernel"}
  assert frozen(2) == frozen(1) | {"backbone/layer2_0/conv1/kernel",
                                   "backbone/layer2_0/conv2/kernel"}
  with pytest.raises(ValueError, match="frozen_stages"):
    opt.frozen_prefixes(5)


def test_weight_decay_mask_skips_biases_unless_asked():
  params = _params(np.random.default_rng(0))
  mask = traverse_util.flatten_dict(opt.weight_decay_mask(params))
  assert not mask[("fpn", "inner_blocks_0", "bias")] and not mask[("box_head", "fc6", "bias")]
  assert all(v for k, v in mask.items() if k[-1] == "kernel")
  assert all(traverse_util.flatten_dict(opt.weight_decay_mask(params, True)).values())


@pytest.mark.reference
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_matches_torch_sgd_and_frozen_params_never_move(clip):
  """Several updates of make_optimizer == torch.optim.SGD (momentum, weight decay on kernels only,
  grad-norm clipping of the trained parameters, the same lr schedule), frozen ones exactly fixed."""
  torch, _ = torch_or_skip()
  rng = np.random.default_rng(0)
  training = _training(clip_grad_norm=clip)
  params = _params(rng)
  tx = opt.make_optimizer(training, params)
  state = tx.init(params)
  schedule = opt.learning_rate_schedule(training)

  flat = traverse_util.flatten_dict(params)
  labels = traverse_util.flatten_dict(opt.trainable_labels(params, training.frozen_stages))
  trained = [k for k in flat if labels[k] == opt.TRAIN]
  tparams = {k: torch.tensor(np.asarray(flat[k]), dtype=torch.float64, requires_grad=True)
             for k in trained}
  groups = [{"params": [tparams[k] for k in trained if k[-1] == "kernel"],
             "weight_decay": training.weight_decay},
            {"params": [tparams[k] for k in trained if k[-1] != "kernel"], "weight_decay": 0.0}]
  sgd = torch.optim.SGD(groups, lr=training.learning_rate, momentum=training.momentum)

  p = params
  for t in range(10):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    gflat = traverse_util.flatten_dict(grads)
    for k in trained:
      tparams[k].grad = torch.tensor(np.asarray(gflat[k]), dtype=torch.float64)
    if clip:
      torch.nn.utils.clip_grad_norm_([tparams[k] for k in trained], clip)
    for g in sgd.param_groups:
      g["lr"] = float(schedule(t))
    sgd.step()

  out = traverse_util.flatten_dict(p)
  for k in flat:
    if labels[k] == opt.FROZEN:
      np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(flat[k]), err_msg=str(k))
    else:
      np.testing.assert_allclose(np.asarray(out[k]), tparams[k].detach().numpy(), rtol=2e-5,
                                 atol=2e-6, err_msg=str(k))
      assert not np.array_equal(np.asarray(out[k]), np.asarray(flat[k]))
  # Frozen parameters keep no momentum buffers.
  n_state = sum(np.size(x) for x in jax.tree.leaves(state))
  assert n_state <= sum(np.size(flat[k]) for k in trained) + 16
