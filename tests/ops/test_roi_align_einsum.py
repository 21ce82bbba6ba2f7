"""The einsum (accelerator) form of RoIAlign: equal to the gather form and to torchvision, forward
and gradient, for every box the public functions admit (boxes beyond the window take the gather
forward), and scatter-free: `jax.grad` of `maskrcnn_jax.ops.roi_align` exported for tpu and cuda
holds no scatter, while the cpu lowering keeps the gather form."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

ra = importlib.import_module("maskrcnn_jax.ops.roi_align")  # the module (ops.roi_align is the fn)

TOL = 1e-4


def _boxes(rng, n, low, high, size):
  xy = rng.uniform(low, high, (n, 2))
  wh = rng.uniform(0, size, (n, 2))
  wh[:3] = 0.0  # degenerate boxes
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _vjp(fn, features, cotangent=None):
  out, back = jax.vjp(fn, jnp.asarray(features))
  if cotangent is None:
    cotangent = np.random.default_rng(7).normal(size=out.shape).astype(np.float32)
  return np.asarray(out, np.float32), np.asarray(back(jnp.asarray(cotangent, out.dtype))[0],
                                                   np.float32), cotangent


def _torch(features, boxes, size, scale, ratio, aligned, cotangent):
  f = torch.tensor(features).permute(2, 0, 1)[None].requires_grad_()
  rois = torch.cat([torch.zeros(len(boxes), 1), torch.tensor(boxes)], 1)
  out = torchvision.ops.roi_align(f, rois, size, scale, ratio, aligned)
  out.backward(torch.tensor(cotangent).permute(0, 3, 1, 2))
  return out.permute(0, 2, 3, 1).detach().numpy(), f.grad[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("window", [ra.EINSUM_WINDOW, 6])  # 6: most boxes take the fallback
@pytest.mark.parametrize("ratio,aligned", [(2, False), (0, False), (2, True), (1, False)])
def test_single_level_equals_gather_and_torchvision(monkeypatch, window, ratio, aligned):
  monkeypatch.setattr(ra, "EINSUM_WINDOW", window)
  rng = np.random.default_rng(ratio * 2 + aligned)
  features = rng.normal(size=(37, 45, 5)).astype(np.float32)
  boxes = _boxes(rng, 40, -10, 80, 40)  # partly outside the map, some spanning > 6 pixels
  got = {}
  ct = None
  for method in ("gather", "einsum"):
    fn = functools.partial(ra.roi_align, boxes=jnp.asarray(boxes), output_size=7,
                           spatial_scale=0.5, sampling_ratio=ratio, aligned=aligned,
                           method=method)
    out, grad, ct = _vjp(lambda f, fn=fn: fn(f), features, ct)
    got[method] = (out, grad)
  want = _torch(features, boxes, 7, 0.5, ratio, aligned, ct)
  for a, b in zip(got["einsum"], got["gather"]):
    np.testing.assert_allclose(a, b, atol=TOL)
  for a, b in zip(got["einsum"], want):
    np.testing.assert_allclose(a, b, atol=TOL)


def test_window_fits_only_small_boxes():
  """The forward takes the window form exactly when every box's samples span at most the window
  (the test that decides the `lax.cond`)."""
  small = np.array([[2.0, 3.0, 20.0, 25.0]], np.float32)  # at scale 1: a 19 x 23 pixel span
  plan = ra._sampling_plan(jnp.asarray(small), jnp.ones(1), jnp.full(1, 100), jnp.full(1, 100),
                           jnp.zeros(1, jnp.int32), (7, 7), 2, False)
  assert bool(ra._fits_window(plan, 64)) and bool(ra._fits_window(plan, 25))
  assert not bool(ra._fits_window(plan, 20))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_multilevel_batched_with_extents_equals_gather(dtype):
  """FPN levels (one of height 1: the pad rows), a batch, bucketed extents, both dtypes."""
  rng = np.random.default_rng(3)
  shapes = [(32, 40), (16, 20), (8, 10), (1, 5)]
  features = [jnp.asarray(rng.normal(size=(2, h, w, 8)), dtype) for h, w in shapes]
  boxes = np.stack([_boxes(rng, 30, -5, 150, 140) for _ in range(2)])
  extents = np.array([[[h, w] for h, w in shapes], [[h - h // 4, w - w // 5] for h, w in shapes]],
                     np.int32)
  scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
  ct = rng.normal(size=(2, 30, 7, 7, 8)).astype(np.float32)
  got = {}
  for method in ("gather", "einsum"):
    def fn(*maps, method=method):
      return ra.multilevel_roi_align_batched(list(maps), jnp.asarray(boxes), 7, scales,
                                             canonical_scale=56, extents=extents, method=method)
    out, back = jax.vjp(fn, *features)
    got[method] = [np.asarray(out, np.float32)] + [
        np.asarray(g, np.float32) for g in back(jnp.asarray(ct, out.dtype))]
  levels = np.asarray(ra.map_roi_levels(jnp.asarray(boxes.reshape(-1, 4)), 2, 5, 56))
  assert len(set(levels.tolist())) == 4  # every level is used
  tol = TOL if dtype == jnp.float32 else 2e-2  # bf16 outputs: one rounding of the float32 sum
  for a, b in zip(got["einsum"], got["gather"]):
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()))


def test_vmap_and_jit_of_the_einsum_form():
  rng = np.random.default_rng(5)
  features = rng.normal(size=(3, 20, 24, 4)).astype(np.float32)
  boxes = np.stack([_boxes(rng, 10, 0, 40, 30) for _ in range(3)])
  fn = functools.partial(ra.roi_align, output_size=(5, 4), spatial_scale=0.5, method="einsum")
  mapped = jax.jit(jax.vmap(fn))(features, boxes)
  loop = np.stack([ra.roi_align(f, b, (5, 4), 0.5, method="gather")
                   for f, b in zip(features, boxes)])
  np.testing.assert_allclose(mapped, loop, atol=TOL)
  with pytest.raises(ValueError, match="method"):
    ra.roi_align(features[0], boxes[0], 7, method="scatter")


def _lowered_ops(fn, args, platform):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return {op: text.count(f"stablehlo.{op}") for op in ("scatter", "gather", "dot_general")}


def test_gradient_of_public_roi_align_has_no_scatter_on_accelerators():
  """`jax.grad` of the public `maskrcnn_jax.ops.roi_align` (default method) exported for tpu and
  cuda: no scatter (matmuls instead); for cpu: the gather form's scatter-add."""
  from maskrcnn_jax.ops import roi_align
  rng = np.random.default_rng(9)
  features = rng.normal(size=(50, 60, 16)).astype(np.float32)
  boxes = _boxes(rng, 64, 0, 100, 40)

  def loss(f, b):
    return jnp.sum(roi_align(f, b, 7, 0.25, 2) ** 2)

  grad = jax.grad(loss)
  cpu = _lowered_ops(grad, (features, boxes), "cpu")
  assert cpu["scatter"] >= 1, cpu
  for platform in ("tpu", "cuda"):
    ops = _lowered_ops(grad, (features, boxes), platform)
    assert ops["scatter"] == 0 and ops["dot_general"] >= 4, (platform, ops)
    exported = jax.export.export(jax.jit(grad), platforms=(platform,))(features, boxes)
    assert "stablehlo.scatter" not in exported.mlir_module()
  # The same program on this CPU: the gradient equals the einsum form's.
  want = jax.grad(lambda f: jnp.sum(roi_align(f, boxes, 7, 0.25, 2, method="einsum") ** 2))
  np.testing.assert_allclose(jax.jit(grad)(features, boxes), want(features), atol=TOL)
