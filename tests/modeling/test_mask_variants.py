"""Mask head variants (`mask_head.type`, `class_agnostic`, `loss`, `deconv_channels`): the softmax
loss and the class-agnostic sigmoid loss against float64 numpy implementations of their
definitions, every variant's `predict` and `loss` against numpy on the head's own logits,
construction errors, and the whole tiny model built with each switch (traced, not compiled: the
numbers are checked head by head, cheaply)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from maskrcnn_jax.modeling.builder import build_model
from maskrcnn_jax.modeling.losses import maskrcnn_loss, maskrcnn_softmax_loss
from maskrcnn_jax.modeling.mask_head import MaskHead, MLPMaskHead
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, init_variables
from maskrcnn_jax.modeling.roi_heads import HeadContext
from maskrcnn_jax.modeling.samplers import RoISamples
from tests.conftest import quick_variables

K = 4  # the tiny config's classes, background included
TOL = dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# float64 numpy definitions


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax_loss(logits, channels, targets, valid):
  """-(t log p_c + (1 - t) log p_0) per pixel, mean over the pixels of the valid RoIs."""
  logp = np_log_softmax(logits.astype(np.float64))
  t = targets.astype(np.float64)
  total, count = 0.0, 0
  for i in np.flatnonzero(valid):
    total += np.sum(-(t[i] * logp[i, ..., channels[i]] + (1 - t[i]) * logp[i, ..., 0]))
    count += t[i].size
  return total / count if count else 0.0


def np_bce_loss(logits, targets, valid):
  """Binary cross-entropy of one map per RoI [P, S, S], mean over the pixels of the valid RoIs."""
  x, t = logits.astype(np.float64), targets.astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  bce = -(t * np.log(p) + (1 - t) * np.log1p(-p))
  return bce[valid].mean() if valid.any() else 0.0


def np_mask_probability(logits, labels, loss, class_agnostic):
  """The labelled class' mask probability from logits [N, S, S, C]."""
  x = logits.astype(np.float64)
  n = np.arange(len(labels))
  if loss == "softmax":
    p = np.exp(np_log_softmax(x))
    return p[n, ..., 1] if class_agnostic else p[n, ..., labels]
  picked = x[n, ..., 0] if class_agnostic else x[n, ..., labels]
  return 1 / (1 + np.exp(-picked))


# ------------------------------------------------------------------------------------------------
# The loss functions


@pytest.mark.parametrize("num_channels,agnostic", [(K, False), (91, False), (2, True)])
def test_softmax_loss_equals_numpy(num_channels, agnostic):
  rng = np.random.default_rng(num_channels)
  p, s = 7, 6
  logits = rng.normal(0, 3, (p, s, s, num_channels)).astype(np.float32)
  channels = np.ones(p, np.int32) if agnostic else rng.integers(1, num_channels, p).astype(
      np.int32)
  targets = rng.uniform(0, 1, (p, s, s)).astype(np.float32)
  targets[0] = 1.0
  targets[1] = 0.0
  fn = jax.jit(maskrcnn_softmax_loss)
  for valid in (rng.uniform(size=p) < 0.6, np.ones(p, bool), np.zeros(p, bool)):
    ours = float(fn(jnp.asarray(logits), jnp.asarray(channels), jnp.asarray(targets),
                    jnp.asarray(valid)))
    np.testing.assert_allclose(ours, np_softmax_loss(logits, channels, targets, valid), **TOL)
  assert ours == 0.0  # no valid RoI


def test_softmax_loss_needs_a_background_channel():
  with pytest.raises(ValueError, match="background and a foreground channel"):
    maskrcnn_softmax_loss(jnp.zeros((2, 4, 4, 1)), jnp.ones(2, jnp.int32), jnp.zeros((2, 4, 4)),
                          jnp.ones(2, bool))


def test_class_agnostic_sigmoid_loss_ignores_labels():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (9, 6, 6, 1)).astype(np.float32)
  targets = rng.uniform(0, 1, (9, 6, 6)).astype(np.float32)
  valid = rng.uniform(size=9) < 0.7
  ref = np_bce_loss(logits[..., 0], targets, valid)
  fn = jax.jit(maskrcnn_loss)
  for labels in (np.ones(9), rng.integers(1, 91, 9), np.zeros(9)):
    ours = fn(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), jnp.asarray(targets),
              jnp.asarray(valid))
    np.testing.assert_allclose(float(ours), ref, **TOL)


# ------------------------------------------------------------------------------------------------
# The heads: predict and loss on random features, against numpy on the head's own logits


def _config(**mask_head):
  c = tiny.get_config()
  c.model.rpn.post_nms_topk_train = 64
  c.model.roi_sampler.batch_size_per_image = 32
  c.model.mask_sampler.num_rois = 8
  c.model.rpn.pre_nms_topk_test = 50
  c.model.rpn.post_nms_topk_test = 20
  c.model.postprocess.detections_per_image = 10
  c.model.postprocess.candidates_per_image = 100
  pooled = mask_head.pop("pooled", None)
  if pooled:
    c.model.mask_pooler.output_size = pooled
  levels = mask_head.pop("levels", None)
  if levels:
    c.model.mask_pooler.levels = levels
  for k, v in mask_head.items():
    c.model.mask_head[k] = v
  return c


def _head(**mask_head):
  """The tiny config's mask head with `mask_head` overrides, pooling one level (P2: one cheap
  compile per variant)."""
  return build_model(_config(levels=(2,), **mask_head).model).head("mask_head")


def _random_params(head, rng, ctx, dets):
  """The head's parameters: kernels ~ N(0, 4 / fan_in), biases ~ N(0, 0.01): logits of order 1
  or more that vary between pixels and channels."""
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), ctx, dets,
                                            method=type(head).predict))
  def fill(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0
    std = 2 / np.sqrt(fan_in) if fan_in else 0.1
    return jnp.asarray(rng.normal(0, std, s.shape), s.dtype)
  return jax.tree.map(fill, shapes)


def _head_inputs(rng, channels, canvas=64, b=2, r=5, m=3):
  """P2 features, detections, and sampled RoIs (the same boxes: ground-truth boxes moved by up to
  a third of their size, so that the mask targets are not empty) with their ground truth."""
  feats = {2: jnp.asarray(rng.normal(0, 1, (b, canvas // 4, canvas // 4, channels)), jnp.float32)}
  gxy = rng.uniform(0, canvas - 30, (b, m, 2))
  gt_boxes = np.concatenate([gxy, gxy + rng.uniform(8, 30, (b, m, 2))], -1).astype(np.float32)
  gt_index = rng.integers(0, m, (b, r))
  g = np.take_along_axis(gt_boxes, gt_index[..., None], 1)
  wh = np.concatenate([g[..., 2:] - g[..., :2]] * 2, -1)
  boxes = np.clip(g + rng.uniform(-0.3, 0.3, g.shape) * wh, 0, canvas).astype(np.float32)
  valid = rng.uniform(size=(b, r)) < 0.7
  valid[0, :2] = True
  valid[1] = False  # an image without foreground RoIs: loss 0
  labels = rng.integers(1, K, (b, r)).astype(np.int32)
  dets = dict(boxes=jnp.asarray(boxes), labels=jnp.asarray(labels), valid=jnp.asarray(valid),
              scores=jnp.ones((b, r)))
  batch = dict(gt_boxes=jnp.asarray(gt_boxes),
               gt_masks=jnp.asarray(rng.uniform(size=(b, m, 28, 28)) < 0.5, jnp.float32))
  samples = RoISamples(rois=jnp.asarray(boxes), classes=jnp.asarray(np.where(valid, labels, 0)),
                       gt_index=jnp.asarray(gt_index, jnp.int32), is_positive=jnp.asarray(valid),
                       valid=jnp.asarray(valid))
  return feats, dets, samples, batch


def _run_head(head, feats, dets, samples, batch, shuffled_classes, rng):
  """predict, loss (also with other classes on the RoIs) and the head's logits on the returned
  pooled features, in one compile."""
  def ctx(train):
    return HeadContext(feats, None, train, None, None, {})
  params = _random_params(head, rng, ctx(False), dets)

  @jax.jit
  def run(params, dets, samples, shuffled):
    call = lambda x: head.apply(params, x.reshape((-1,) + x.shape[2:]))
    pred = head.apply(params, ctx(False), dets, method=type(head).predict)
    loss = head.apply(params, ctx(True), samples, batch, method=type(head).loss)
    other = jax.vmap(lambda c: head.apply(params, ctx(True), samples._replace(classes=c), batch,
                                          method=type(head).loss)["loss_mask"])(shuffled[None])
    return pred, loss, other[0], call(pred["mask_features"]), call(loss["mask_features"])
  return run(params, dets, samples, shuffled_classes)


VARIANTS = {  # name: (mask_head overrides, mask channels, mask side)
    "fcn-softmax": (dict(loss="softmax"), K, 28),
    "fcn-no-convs-agnostic-sigmoid": (
        dict(layers=(), deconv_channels=16, class_agnostic=True), 1, 28),
    "mlp-7x7-agnostic-softmax": (
        dict(type="mlp", mlp_layers=(16, 16, 16), class_agnostic=True, loss="softmax", pooled=7),
        2, 14),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_head_predict_and_loss_equal_numpy(name):
  overrides, channels, side = VARIANTS[name]
  head = _head(**overrides)
  agnostic, loss_type = head.class_agnostic, head.loss_type
  rng = np.random.default_rng(len(name))
  feats, dets, samples, batch = _head_inputs(rng, 32)
  shuffled = jnp.where(samples.valid, jnp.roll(samples.classes, 1, axis=1) % (K - 1) + 1, 0)
  pred, loss, loss_other_classes, logits_pred, logits_loss = jax.device_get(
      _run_head(head, feats, dets, samples, batch, shuffled, rng))
  b, r = samples.valid.shape
  assert logits_pred.shape == (b * r, side, side, channels)
  assert pred["masks"].shape == (b, r, side, side)

  # predict: the labelled class' probability, also as mask_probs and as sigmoid(mask_logits).
  labels = np.asarray(dets["labels"]).reshape(-1)
  ref = np_mask_probability(logits_pred, labels, loss_type, agnostic).reshape(b, r, side, side)
  np.testing.assert_allclose(pred["masks"], ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(pred["mask_probs"], pred["masks"])
  np.testing.assert_allclose(1 / (1 + np.exp(-pred["mask_logits"].astype(np.float64))), ref,
                             rtol=1e-5, atol=1e-6)
  assert 0.05 < ref.std(), "probabilities should vary"

  # loss: the definition on the head's logits and its own targets, per image, then the mean.
  classes = np.asarray(samples.classes)
  valid = np.asarray(samples.valid)
  lg = logits_loss.reshape(b, r, side, side, channels)
  per_image = []
  for i in range(b):
    if loss_type == "softmax":
      ch = np.ones(r, int) if agnostic else classes[i]
      per_image.append(np_softmax_loss(lg[i], ch, loss["mask_targets"][i], valid[i]))
    else:
      picked = lg[i, ..., 0] if agnostic else np.take_along_axis(
          lg[i], classes[i][:, None, None, None], -1)[..., 0]
      per_image.append(np_bce_loss(picked, loss["mask_targets"][i], valid[i]))
  assert per_image[1] == 0.0 and float(loss["loss_mask"]) > 0
  np.testing.assert_allclose(float(loss["loss_mask"]), np.mean(per_image), **TOL)
  train_ref = np_mask_probability(logits_loss, classes.reshape(-1), loss_type,
                                  agnostic).reshape(b, r, side, side)
  np.testing.assert_allclose(loss["mask_probs"], train_ref, rtol=1e-5, atol=1e-6)
  # Class-agnostic: the classes do not matter; per-class: they do.
  if agnostic:
    assert float(loss_other_classes) == float(loss["loss_mask"])
  else:
    assert abs(float(loss_other_classes) - float(loss["loss_mask"])) > 1e-4


# ------------------------------------------------------------------------------------------------
# Construction


def test_default_config_keeps_todays_head_and_parameters():
  c = _config()
  head = build_model(c.model).head("mask_head")
  assert type(head) is MaskHead
  assert (head.class_agnostic, head.loss_type, head.deconv_channels) == (False, "sigmoid", 0)
  shapes = jax.eval_shape(lambda: init_variables(build_model(c.model), jax.random.key(0)))
  tree = jax.tree.map(lambda s: s.shape, shapes["params"]["mask_head"])
  assert tree == {"mask_fcn1": {"kernel": (3, 3, 32, 32), "bias": (32,)},
                  "mask_fcn2": {"kernel": (3, 3, 32, 32), "bias": (32,)},
                  "conv5_mask": {"kernel": (2, 2, 32, 32), "bias": (32,)},
                  "mask_fcn_logits": {"kernel": (1, 1, 32, K), "bias": (K,)}}


@pytest.mark.parametrize("overrides,message", [
    (dict(loss="bce"), r"mask_head.loss must be one of \('sigmoid', 'softmax'\), got 'bce'"),
    (dict(class_agnostic="yes"), "mask_head.class_agnostic must be a bool"),
    (dict(layers=()), "mask_head.deconv_channels must be > 0 when mask_head.layers is empty"),
    (dict(deconv_channels=-1), "mask_head.deconv_channels must be >= 0"),
    (dict(layers=(32, 0)), "mask_head.layers must be positive"),
    (dict(type="mlp", mlp_layers=()), "mask_head.mlp_layers needs at least one fc"),
    (dict(type="mlp", mlp_layers=(64, 0)), "mask_head.mlp_layers needs at least one fc"),
    (dict(type="mlpp"), r"mask_head.type must be one of \['fcn', 'mlp', 'none'\]"),
])
def test_construction_errors(overrides, message):
  model = tiny.get_config().model
  # Plain dicts: a ConfigDict would refuse a value of another type ('yes' for a bool) itself.
  with pytest.raises(ValueError, match=message):
    build_model(dict(model, mask_head=dict(model.mask_head, **overrides)))


def test_mlp_head_needs_no_fcn_keys():
  """The builder passes a type only its own fields: `layers` etc. do not reach the MLP head, and
  the MLP's keys do not reach the FCN head; the loss alias is checked against its target."""
  head = _head(type="mlp", layers=())
  assert type(head) is MLPMaskHead and head.mlp_layers == (1024, 1024)
  assert not hasattr(head, "layers")
  model = _config().model
  with pytest.raises(ValueError, match="alias"):
    build_model(dict(model, mask_head=dict(model.mask_head, loss="softmax", loss_type="sigmoid")))


# ------------------------------------------------------------------------------------------------
# The whole model with each switch


@pytest.mark.parametrize("overrides,channels", [
    (dict(type="mlp"), K), (dict(class_agnostic=True), 1), (dict(loss="softmax"), K)])
def test_tiny_model_builds_trains_and_predicts(overrides, channels):
  """init_variables, losses and __call__ traced on the tiny model with one override each (shapes
  and wiring; the numbers are the head tests' above)."""
  model = build_model(_config(**overrides).model)
  variables = quick_variables(model)  # init_variables' shapes, traced
  logits_bias = variables["params"]["mask_head"][
      "mask_fc_logits" if overrides.get("type") == "mlp" else "mask_fcn_logits"]["bias"]
  assert logits_bias.shape == ((28 * 28 * channels,) if overrides.get("type") == "mlp"
                               else (channels,))
  rng = np.random.default_rng(0)
  boxes = np.asarray([[[8, 10, 40, 44], [30, 20, 60, 60]]], np.float32)
  batch = dict(image=rng.normal(0, 1, (1, 64, 64, 3)).astype(np.float32),
               image_size=np.full((1, 2), 64, np.int32), gt_boxes=boxes,
               gt_classes=np.asarray([[1, 3]], np.int32), gt_valid=np.ones((1, 2), bool),
               gt_masks=np.ones((1, 2, 28, 28), np.float32))
  sizes = jnp.full((1, 2), 64, jnp.int32)

  def run(variables, batch):
    losses, _ = model.apply(variables, batch, jax.random.split(jax.random.key(1), 1),
                            method=MaskRCNN.losses, mutable=["batch_stats"])
    return losses, model.apply(variables, batch["image"], sizes, sizes)
  losses, out = jax.eval_shape(run, variables, batch)
  assert losses["loss_mask"].shape == () and losses["loss_mask"].dtype == jnp.float32
  assert out["masks"].shape == (1, 10, 28, 28)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_per_label_logits_equal_the_labelled_channel_of_all(dtype):
  """The FCN head given labels computes only each RoI's labelled channel (what the per-class
  sigmoid loss and the predictions read): equal to picking it from all channels, values and the
  loss's gradients (float tolerance)."""
  head = MaskHead(num_classes=7, pooler=None, layers=(8, 8), dtype=dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 7, 7, 5)), jnp.float32)
  labels = jnp.asarray([0, 6, 3, 3, 1, 5], jnp.int32)
  targets = jnp.asarray(rng.random((6, 14, 14)) > 0.5, jnp.float32)
  valid = jnp.asarray([True, True, True, False, True, True])
  params = head.init(jax.random.key(1), x)
  assert head.apply(params, x).shape == (6, 14, 14, 7)
  one = head.apply(params, x, labels=labels)
  assert one.shape == (6, 14, 14, 1)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  full = head.apply(params, x)
  np.testing.assert_allclose(np.asarray(one[..., 0]),
                             np.asarray(jnp.take_along_axis(full, labels[:, None, None, None],
                                                            -1)[..., 0]), **tol)

  def loss(p, per_label):
    logits = head.apply(p, x, labels=labels) if per_label else head.apply(p, x)
    return maskrcnn_loss(logits, labels, targets, valid)
  g1, g0 = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
  np.testing.assert_allclose(float(loss(params, True)), float(loss(params, False)), **tol)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)
