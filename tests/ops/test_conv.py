"""ops.conv: the convolution whose CPU kernel gradient is per-tap matmuls, against torch's conv2d
autograd in float64 (forward, input gradient, kernel gradient)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

from maskrcnn_jax.ops.conv import conv_general_dilated, kernel_grad_by_taps

torch = pytest.importorskip("torch")

NHWC = ("NHWC", "HWIO", "NHWC")


def _torch_reference(x, w, g, stride, pads, dilation):
  """Forward, d/dx and d/dw of conv2d in float64 for NHWC x [N,H,W,C], HWIO w, cotangent g."""
  xt = torch.tensor(np.asarray(x, np.float64).transpose(0, 3, 1, 2), requires_grad=True)
  wt = torch.tensor(np.asarray(w, np.float64).transpose(3, 2, 0, 1), requires_grad=True)
  (top, bottom), (left, right) = pads
  xp = torch.nn.functional.pad(xt, (left, right, top, bottom))
  y = torch.nn.functional.conv2d(xp, wt, stride=stride, dilation=dilation)
  y.backward(torch.tensor(np.asarray(g, np.float64).transpose(0, 3, 1, 2)))
  return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
          wt.grad.numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("seed,shape,cout,kernel,stride,pads,dilation", [
    (0, (2, 9, 11, 5), 7, 3, 1, ((1, 1), (1, 1)), 1),
    (1, (3, 12, 10, 4), 6, 3, 2, ((1, 1), (1, 1)), 1),   # ResNet's strided 3x3
    (2, (2, 13, 13, 3), 4, 7, 2, ((3, 3), (3, 3)), 1),   # the stem
    (3, (2, 8, 9, 6), 5, 1, 2, ((0, 0), (0, 0)), 1),     # strided 1x1 downsample
    (4, (1, 10, 12, 4), 3, 3, 1, ((2, 2), (2, 2)), 2),   # dilated
    (5, (2, 11, 9, 3), 4, 3, 3, ((0, 2), (1, 0)), 1),    # asymmetric padding, stride 3
])
def test_conv_and_both_gradients_equal_torch(seed, shape, cout, kernel, stride, pads, dilation):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, shape[3], cout)).astype(np.float32)

  def f(x, w):
    return conv_general_dilated(x, w, (stride, stride), pads, rhs_dilation=(dilation, dilation),
                                dimension_numbers=NHWC)

  y, vjp = jax.vjp(jax.jit(f), x, w)
  g = rng.normal(size=y.shape).astype(np.float32)
  dx, dw = vjp(g)
  ry, rdx, rdw = _torch_reference(x, w, g, stride, pads, dilation)
  for ours, ref in ((y, ry), (dx, rdx), (dw, rdw)):
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  # The matmul form itself (what the CPU backward runs), called directly.
  taps = kernel_grad_by_taps(jnp.asarray(x), jnp.asarray(g), (kernel, kernel), (stride, stride),
                             pads, (dilation, dilation))
  np.testing.assert_allclose(np.asarray(taps), rdw, rtol=1e-4, atol=1e-4 * np.abs(rdw).max())


def test_same_padding_strings_and_fallbacks_equal_lax():
  """'SAME'/'VALID' go through the matmul form; grouped convs and other layouts fall through to
  lax.conv_general_dilated unchanged."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 10, 9, 4)), jnp.float32)
  for padding, stride in (("SAME", 2), ("VALID", 1)):
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)

    def grads(fn):
      return jax.grad(lambda x, w: jnp.sum(fn(x, w, (stride, stride), padding,
                                              dimension_numbers=NHWC) ** 2), (0, 1))(x, w)

    for ours, ref in zip(grads(conv_general_dilated), grads(lax.conv_general_dilated)):
      np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)
  grouped = jnp.asarray(rng.normal(size=(3, 3, 2, 6)), jnp.float32)
  args = (x, grouped, (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(
      conv_general_dilated(*args, dimension_numbers=NHWC, feature_group_count=2),
      lax.conv_general_dilated(*args, dimension_numbers=NHWC, feature_group_count=2))


def test_kernel_gradient_form_is_chosen_per_platform():
  """Lowered for cpu the kernel gradient is a scan of matmuls (a while loop, 2 convolutions:
  forward and input gradient); for tpu and cuda XLA's own 3 convolutions and no loop."""
  x = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)

  def loss(x, w):
    return jnp.sum(conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=NHWC) ** 2)

  grad = jax.jit(jax.grad(loss, (0, 1)))
  for platform, convs, loops in (("cpu", 2, 1), ("tpu", 3, 0), ("cuda", 3, 0)):
    text = export.export(grad, platforms=[platform])(x, w).mlir_module()
    assert text.count("stablehlo.convolution") == convs, platform
    assert text.count("stablehlo.while") == loops, platform
