"""The RoI-head seam: a head defined here (outside the package) is registered, switched on from the
config, trained (its loss is in the objective and moves its parameters) and predicts; build-time
validation of types, keys and head dependencies; batch-statistics norms (v2-style heads) train."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import maskrcnn_jax
from configs import tiny
from maskrcnn_jax.modeling import builder
from maskrcnn_jax.modeling.builder import build_model, register_roi_head
from maskrcnn_jax.modeling.mask_rcnn import init_variables
from maskrcnn_jax.modeling.poolers import RoIPooler
from maskrcnn_jax.modeling.roi_heads import RoIHead
from maskrcnn_jax.training import optimizer, parallel
from maskrcnn_jax.training.train_state import TrainState
from tests.conftest import quick_variables


class ToyHead(RoIHead):
  """Predicts, for each RoI, the fraction of its box its ground-truth box covers (a made-up task):
  a conv on its pooled features, global average, one output."""
  batch_keys = ()
  prediction_keys = ("toy_scores",)
  loss_names = ("loss_toy",)
  requires = ("mask_head",)

  width: int = 8
  pooler: RoIPooler = RoIPooler(output_size=7)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.width, (3, 3), padding=1, name="conv")(x))
    return nn.Dense(1, name="out")(jnp.mean(x, axis=(-3, -2)))[..., 0]

  def _scores(self, ctx, boxes):
    pooled = ctx.pool(self.pooler, boxes)
    b, n = pooled.shape[:2]
    return self(pooled.reshape((b * n,) + pooled.shape[2:])).reshape(b, n)

  def predict(self, ctx, detections):
    # Reads the mask head's output, as a head consuming another head's results does.
    assert "mask_head" in ctx.outputs and "masks" in detections
    return dict(toy_scores=jax.nn.sigmoid(self._scores(ctx, detections["boxes"])))

  def loss(self, ctx, samples, batch):
    assert "loss_mask" in ctx.outputs["mask_head"]
    gt = jax.vmap(lambda g, i: g[i])(batch["gt_boxes"], samples.gt_index)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = jnp.maximum(gt[..., :2], samples.rois[..., :2])
    rb = jnp.minimum(gt[..., 2:], samples.rois[..., 2:])
    inter = jnp.prod(jnp.clip(rb - lt, 0), axis=-1)
    target = inter / jnp.maximum(area(samples.rois), 1e-6)
    err = jnp.square(jax.nn.sigmoid(self._scores(ctx, samples.rois)) - target)
    per_image = jnp.sum(jnp.where(samples.valid, err, 0), 1) / jnp.maximum(
        jnp.sum(samples.valid, 1), 1)
    return dict(loss_toy=jnp.mean(per_image))


@pytest.fixture(scope="module")
def toy_registered():
  saved = dict(builder.ROI_HEADS), dict(builder.SAMPLERS)
  register_roi_head("toy_head", "toy", ToyHead, pooler="box_pooler", sampler="mask_sampler")
  yield
  builder.ROI_HEADS.clear()
  builder.ROI_HEADS.update(saved[0])
  builder.SAMPLERS.clear()
  builder.SAMPLERS.update(saved[1])


def _config(**model):
  c = tiny.get_config()
  c.model.rpn.post_nms_topk_train = 64
  c.model.roi_sampler.batch_size_per_image = 32
  c.model.mask_sampler.num_rois = 8
  for k, v in model.items():
    c.model[k] = v
  return c


def _batch(n=2, size=64):
  rng = np.random.default_rng(0)
  boxes = np.zeros((n, 3, 4), np.float32)
  boxes[:, 0] = [8, 10, 40, 44]
  boxes[:, 1] = [30, 20, 60, 60]
  valid = np.zeros((n, 3), bool)
  valid[:, :2] = True
  return dict(image=rng.normal(0, 1, (n, size, size, 3)).astype(np.float32),
              image_size=np.full((n, 2), size, np.int32), gt_boxes=boxes,
              gt_classes=np.where(valid, 1 + np.arange(3) % 3, 0).astype(np.int32),
              gt_valid=valid, gt_masks=np.ones((n, 3, 28, 28), np.float32),
              crowd_boxes=np.zeros((n, 1, 4), np.float32), crowd_valid=np.zeros((n, 1), bool))


def _steps(model, batch, steps=2, frozen_stages=0, pass_trainable=False):
  """`steps` train steps on one device (the production step) -> (initial state, final state,
  metrics per step). `pass_trainable`: give the step the trainable mask, as train.py does (it
  then differentiates the trained leaves only)."""
  training = tiny.get_config().training
  training.frozen_stages = frozen_stages
  training.clip_grad_norm = 0.0
  variables = quick_variables(model)
  tx = optimizer.make_optimizer(training, variables["params"])
  mesh = parallel.make_mesh(jax.devices()[:1])
  trainable = (optimizer.trainable_mask(variables["params"], frozen_stages) if pass_trainable
               else None)
  step = parallel.make_parallel_step(
      parallel.make_train_step(model, tx, optimizer.learning_rate_schedule(training), trainable),
      mesh)
  start = jax.device_get(TrainState.create(variables, tx, seed=1))
  state = parallel.replicate(start, mesh)
  metrics = []
  for _ in range(steps):
    state, m = step(state, parallel.global_batch(batch, mesh, model.batch_keys))
    metrics.append({k: float(v) for k, v in parallel.to_host(m).items()})
  return start, parallel.to_host(state), metrics


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _v2_norms(c):
  """torchvision v2's norms on the tiny model: BatchNorm in the backbone, FPN and both heads."""
  m = c.model
  m.backbone.norm = "bn"
  m.fpn.norm = "bn"
  m.rpn.conv_depth = 2
  m.box_head.conv_layers = (16, 16)
  m.box_head.fc_layers = (32,)
  m.box_head.norm = "bn"
  m.mask_head.norm = "bn"
  return c


@pytest.fixture(scope="module")
def trained_toy(toy_registered):
  """The toy head switched on from the config, on a model with batch-statistics norms (one
  compile serves the seam and the norms), trained 2 steps with the stem and layer1 frozen."""
  c = _v2_norms(_config(toy_head=dict(type="toy", width=8)))
  model = build_model(c.model, frozen_stages=1)
  start, end, metrics = _steps(model, _batch(), steps=2, frozen_stages=1)
  return model, start, end, metrics


@pytest.mark.slow
def test_registered_head_trains_and_predicts(trained_toy):
  model, start, end, metrics = trained_toy
  assert model.head_names == ("mask_head", "toy_head")
  assert "loss_toy" in model.loss_names and "toy_scores" in model.prediction_keys
  for m in metrics:
    assert np.isfinite(m["loss_toy"]) and m["loss_toy"] > 0
    parts = sum(v for k, v in m.items() if k.startswith("loss_"))
    np.testing.assert_allclose(m["loss"], parts, rtol=1e-5)  # the objective counts loss_toy
  before, after = _flat(start.params["toy_head"]), _flat(end.params["toy_head"])
  assert sorted(before) == ["conv/bias", "conv/kernel", "out/bias", "out/kernel"]
  assert all(not np.array_equal(before[k], after[k]) for k in before), "toy head did not train"
  out = jax.jit(model.apply)({"params": end.params, "batch_stats": end.batch_stats},
                             jnp.asarray(_batch()["image"]), jnp.full((2, 2), 64, jnp.int32),
                             jnp.full((2, 2), 64, jnp.int32))
  assert out["toy_scores"].shape == out["scores"].shape
  assert np.all((out["toy_scores"] >= 0) & (out["toy_scores"] <= 1))
  # predict() hands a head's per-detection predictions back with the detections.
  image = (np.random.default_rng(1).uniform(0, 255, (48, 80, 3))).astype(np.uint8)
  res = maskrcnn_jax.predict(model, {"params": end.params, "batch_stats": end.batch_stats},
                             [image], min_size=64, max_size=96)[0]
  assert res["toy_scores"].shape == res["scores"].shape


@pytest.mark.slow
def test_batch_statistics_norms_train(trained_toy):
  """Batch-statistics BatchNorm (v2) trains: the running statistics of every BN layer move except
  those of the frozen stem and layer1, whose parameters stay too."""
  _, start, end, metrics = trained_toy
  assert all(np.isfinite(v) for mt in metrics for v in mt.values())
  before, after = _flat(start.batch_stats), _flat(end.batch_stats)
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  frozen = {k for k in before if k.startswith(("backbone/bn1/", "backbone/layer1_"))}
  assert frozen and not frozen & moved
  for prefix in ("backbone/layer2_0/bn1/", "fpn/inner_blocks_norm_0/", "box_head/norm1/",
                 "mask_head/mask_norm1/"):
    assert {prefix + "running_mean", prefix + "running_var"} <= moved, prefix
  p0, p1 = _flat(start.params), _flat(end.params)
  assert np.array_equal(p0["backbone/bn1/scale"], p1["backbone/bn1/scale"])
  assert not np.array_equal(p0["box_head/norm1/scale"], p1["box_head/norm1/scale"])


def test_loss_weights_scale_the_objective(toy_registered):
  c = _config(toy_head=dict(type="toy"))
  c.model.loss_weights.loss_toy = 3.0
  model = build_model(c.model)
  assert dict(model.loss_weights)["loss_toy"] == 3.0
  losses = {"loss_toy": jnp.float32(2.0), "loss_mask": jnp.float32(1.0), "num_fg_rois": 7.0}
  assert float(model.objective(losses)) == pytest.approx(7.0)
  c.model.loss_weights.loss_bogus = 1.0
  with pytest.raises(ValueError, match="loss_bogus"):
    build_model(c.model)


def test_head_needing_a_head_that_is_off(toy_registered):
  c = _config(toy_head=dict(type="toy"))
  c.model.mask_on = False
  with pytest.raises(ValueError, match="toy_head.*mask_head"):
    build_model(c.model)


def test_build_time_validation(toy_registered):
  c = _config(toy_head=dict(type="toy", widht=8))
  with pytest.raises(ValueError, match="widht"):
    build_model(c.model)
  c = _config(toy_head=dict(type="toyy"))
  with pytest.raises(ValueError, match=r"toy_head.type must be one of \['none', 'toy'\]"):
    build_model(c.model)
  c = _config()
  c.model.mask_head.type = "mlp_typo"
  with pytest.raises(ValueError, match="mask_head.type must be one of"):
    build_model(c.model)
  c = _config()
  c.model.box_head.norm = "batchnorm"
  with pytest.raises(ValueError, match="box_head.norm"):
    build_model(c.model)
  with pytest.raises(TypeError, match="predict"):
    register_roi_head("bad_head", "x", nn.Dense)


def test_build_time_validation_of_shapes():
  c = _config()
  c.model.rpn.anchor_sizes = ((32,), (64,), (128,), (256,))
  with pytest.raises(ValueError, match="anchor_sizes has 4 levels"):
    build_model(c.model)
  c = _config()
  c.model.rpn.anchor_sizes = ((32,), (64,), (128,), (256,), (512, 640))
  with pytest.raises(ValueError, match="same number of sizes"):
    build_model(c.model)
  c = _config()
  c.model.mask_pooler.levels = (3, 4, 5, 6, 7)
  with pytest.raises(ValueError, match="mask_pooler.levels"):
    build_model(c.model)
  c = _config()
  c.model.fpn.norm = "gn"
  c.model.fpn.channels = 48
  with pytest.raises(ValueError, match="fpn.norm='gn' needs channels divisible by 32"):
    build_model(c.model)


@pytest.fixture
def registry():
  """Registrations made by a test are undone after it."""
  saved = dict(builder.ROI_HEADS), dict(builder.SAMPLERS)
  yield
  builder.ROI_HEADS.clear()
  builder.ROI_HEADS.update(saved[0])
  builder.SAMPLERS.clear()
  builder.SAMPLERS.update(saved[1])


def test_losses_cannot_be_dropped_or_shadowed(registry):
  """A loss the objective would not sum (no loss_ prefix) or one that would overwrite another
  head's is refused when the model is built."""
  unnamed = type("Unnamed", (ToyHead,), {"loss_names": ("toy_loss",), "requires": ()})
  shadow = type("Shadow", (ToyHead,), {"loss_names": ("loss_mask",), "requires": ()})
  register_roi_head("unnamed_head", "toy", unnamed, pooler="box_pooler")
  register_roi_head("shadow_head", "toy", shadow, pooler="box_pooler")
  with pytest.raises(ValueError, match="'toy_loss' must start with 'loss_'"):
    build_model(_config(unnamed_head=dict(type="toy")).model)
  with pytest.raises(ValueError, match="shadow_head and mask_head both return 'loss_mask'"):
    build_model(_config(shadow_head=dict(type="toy")).model)
  shadow_box = type("ShadowBox", (ToyHead,), {"loss_names": ("loss_box_reg",), "requires": ()})
  register_roi_head("shadow_head", "box", shadow_box, pooler="box_pooler")
  with pytest.raises(ValueError, match="the box head both return 'loss_box_reg'"):
    build_model(_config(shadow_head=dict(type="box")).model)


def test_head_order_and_registration_errors(registry):
  reader = type("Reader", (ToyHead,), {"loss_names": ("loss_reader",), "requires": ("late_head",)})
  late = type("Late", (ToyHead,), {"loss_names": ("loss_late",), "requires": ()})
  register_roi_head("reader_head", "toy", reader, pooler="box_pooler")
  register_roi_head("late_head", "toy", late, pooler="box_pooler")
  with pytest.raises(ValueError, match="reader_head reads late_head, which runs after it"):
    build_model(_config(reader_head=dict(type="toy"), late_head=dict(type="toy")).model)
  with pytest.raises(ValueError, match="named '<name>_pooler'"):
    register_roi_head("x_head", "toy", late, pooler="box_features")
  with pytest.raises(ValueError, match="already holds ForegroundSampler"):
    register_roi_head("x_head", "toy", late, sampler="mask_sampler", sampler_cls=RoIPooler)
  assert "x_head" not in builder.ROI_HEADS


def test_evaluation_and_data_needs_checked_before_training(registry):
  """A head whose COCO task evaluation does not score fails when the evaluator is made (before
  training), and one whose loss reads a batch entry the pipeline lacks fails before the first
  step, naming the entry."""
  from maskrcnn_jax.evaluation.evaluator import make_training_evaluator
  from maskrcnn_jax.training import trainer
  posed = type("Posed", (ToyHead,), {"eval_task": "pose", "requires": ()})
  hungry = type("Hungry", (ToyHead,), {"batch_keys": ("gt_occlusion",), "requires": ()})
  register_roi_head("posed_head", "toy", posed, pooler="box_pooler")
  register_roi_head("hungry_head", "toy", hungry, pooler="box_pooler")
  with pytest.raises(ValueError, match=r"the model's heads ask for \['pose'\]"):
    make_training_evaluator(_config(posed_head=dict(type="toy")))
  model = build_model(_config(hungry_head=dict(type="toy")).model)
  with pytest.raises(ValueError, match=r"gives no \['gt_occlusion'\]"):
    trainer._check_batch_keys(model, _batch())
  trainer._check_batch_keys(build_model(_config().model), _batch())


def test_mask_off_is_faster_rcnn():
  for c in (_config(mask_on=False), _config()):
    if c.model.mask_on:
      c.model.mask_head.type = "none"
    model = build_model(c.model)
    assert model.head_names == () and model.eval_tasks == ("bbox",)
    assert "gt_masks" not in model.batch_keys and "loss_mask" not in model.loss_names
  variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
  assert "mask_head" not in variables["params"]


def test_mask_head_num_rois_is_an_alias_of_the_mask_sampler():
  c = _config()
  c.model.mask_head.num_rois = 6
  assert c.model.mask_sampler.num_rois == 6
  assert build_model(c.model).roi_heads[0][2].num_rois == 6
  c.model.mask_head.num_rois = 9  # the roi_sampler samples at most 32 * 0.25 = 8 foreground RoIs
  with pytest.raises(ValueError, match="num_rois=9 exceeds the 8 foreground RoIs"):
    build_model(c.model)
  c.model.mask_head.num_rois = 6
  plain = dict(c.model)
  plain["mask_head"] = dict(c.model.mask_head, num_rois=4)  # a plain dict breaks the link
  with pytest.raises(ValueError, match="alias"):
    build_model(plain)
  plain["mask_sampler"] = {}  # the alias alone sets the sampler
  assert build_model(plain).roi_heads[0][2].num_rois == 4


def test_converter_reports_parts_without_a_torchvision_counterpart(toy_registered):
  """A head torchvision does not have is named by the converter, not a KeyError: the strict form
  refuses it in its error, the lenient one leaves it to the caller's initialization."""
  from maskrcnn_jax.convert.torchvision import convert_matching, variables_from_state_dict
  model = build_model(_config(toy_head=dict(type="toy")).model)
  _, report = convert_matching(model, {})
  assert sorted(report["no_counterpart"]) == ["params/toy_head/conv/bias",
                                              "params/toy_head/conv/kernel",
                                              "params/toy_head/out/bias",
                                              "params/toy_head/out/kernel"]
  assert any(k.startswith("roi_heads.mask_predictor.") for k in report["missing"])
  with pytest.raises(ValueError, match=r"no torchvision counterpart \(4\): params/toy_head"):
    variables_from_state_dict(model, {})


def test_frozen_stages_are_not_differentiated():
  """With the trainable mask (train.py's step) the frozen stem and layer1 get no weight gradient
  in the program (fewer convolutions in its jaxpr), and the step's result equals the step that
  differentiates everything and drops the frozen gradients in the optimizer."""
  c = tiny.get_config()
  model = build_model(c.model, frozen_stages=1)
  batch = _batch()
  _, full, m_full = _steps(model, batch, steps=1, frozen_stages=1)
  _, lean, m_lean = _steps(model, batch, steps=1, frozen_stages=1, pass_trainable=True)
  for k in m_full[0]:  # grad_norm: of the trained leaves only when the step knows them
    if k != "grad_norm":
      np.testing.assert_allclose(m_lean[0][k], m_full[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert m_lean[0]["grad_norm"] < m_full[0]["grad_norm"]
  a, b = _flat(full.params), _flat(lean.params)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)

  training = tiny.get_config().training
  training.frozen_stages = 1
  variables = quick_variables(model)
  tx = optimizer.make_optimizer(training, variables["params"])
  state = TrainState.create(variables, tx, seed=1)
  mesh = parallel.make_mesh(jax.devices()[:1])

  def convs(trainable):
    step = parallel.make_parallel_step(parallel.make_train_step(
        model, tx, optimizer.learning_rate_schedule(training), trainable), mesh)
    text = step.trace(state, {k: jnp.asarray(v) for k, v in batch.items()
                              if k in model.batch_keys}).jaxpr.pretty_print()
    return text.count("conv_general_dilated")
  mask = optimizer.trainable_mask(variables["params"], 1)
  frozen_kernels = sum(1 for k, t in traverse_util.flatten_dict(mask).items()
                       if not t and k[-1] == "kernel")
  assert frozen_kernels >= 2
  assert convs(None) - convs(mask) >= frozen_kernels  # one weight-gradient conv per kernel
