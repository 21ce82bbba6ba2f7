"""Where the CPU training step's time goes: the R50-FPN mask head (torchvision's: 4 x 3x3 conv 256,
2x2 deconv, 1x1 predictor on 14x14 RoIs, per-class sigmoid loss on the labelled channel) forward
plus backward at the slot count our step computes (`mask_head.num_rois` = 128 per image, batch 2)
and at the foreground counts torchvision trains on in `bench_train.py` (7-27 per image), and the
convolution kernel gradient in XLA's form vs the per-tap matmul form (`ops.conv`).

    python benchmarks/profile_train_step.py [--slots 256,46] [--runs 3]

Times are best of `--runs` after a compile, `block_until_ready`, in this process (2 cores here).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.add_repo_to_path()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from maskrcnn_jax.modeling.losses import maskrcnn_loss  # noqa: E402
from maskrcnn_jax.modeling.mask_head import MaskHead  # noqa: E402
from maskrcnn_jax.ops.conv import conv_general_dilated  # noqa: E402

NUM_CLASSES = 91
NHWC = ("NHWC", "HWIO", "NHWC")


def best_of(fn, args, runs):
  """Best wall time of `runs` calls of fn(*args) after a compiling call."""
  call = lambda: jax.block_until_ready(fn(*args))
  call()
  return min(_common.timed(call) for _ in range(runs))


def mask_head_seconds(slots: int, runs: int) -> float:
  """Forward + backward (parameters and input features) of the mask head and its loss."""
  head = MaskHead(num_classes=NUM_CLASSES)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(slots, 14, 14, 256)), jnp.float32)
  labels = jnp.asarray(rng.integers(1, NUM_CLASSES, slots), jnp.int32)
  targets = jnp.asarray(rng.random((slots, 28, 28)) > 0.5, jnp.float32)
  valid = jnp.ones((slots,), bool)
  params = head.init(jax.random.PRNGKey(0), x[:1], labels=labels[:1])["params"]

  def loss(params, x):
    logits = head.apply({"params": params}, x, train=True, labels=labels)
    return maskrcnn_loss(logits, jnp.zeros_like(labels), targets, valid)

  return best_of(jax.jit(jax.grad(loss, (0, 1))), (params, x), runs)


def kernel_grad_seconds(runs: int):
  """One 3x3 256 -> 256 conv of the mask head at 256 slots: forward, XLA's kernel gradient and
  the per-tap form."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(256, 14, 14, 256)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 256, 256)) * 0.02, jnp.float32)
  g = jnp.asarray(rng.normal(size=(256, 14, 14, 256)), jnp.float32)
  pads = ((1, 1), (1, 1))

  def fwd(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=NHWC)

  def xla_grad(x, w, g):
    return jax.vjp(lambda w: fwd(x, w), w)[1](g)[0]

  def taps_grad(x, w, g):
    return jax.vjp(lambda w: conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=NHWC),
                   w)[1](g)[0]

  return (best_of(jax.jit(fwd), (x, w), runs), best_of(jax.jit(xla_grad), (x, w, g), runs),
          best_of(jax.jit(taps_grad), (x, w, g), runs))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--slots", default="256,46",
                 help="mask-head batch sizes: ours (2 x 128) and torchvision's foreground count")
  p.add_argument("--runs", type=int, default=3)
  args = p.parse_args()
  print(f"jax {jax.__version__}, {_common.load_average()}")
  fwd, xla, taps = kernel_grad_seconds(args.runs)
  print(f"3x3 conv 256->256 on 256 x 14x14: forward {fwd:.3f} s, kernel gradient XLA form "
        f"{xla:.3f} s, per-tap matmuls {taps:.3f} s ({xla / taps:.1f}x faster)")
  for slots in (int(s) for s in args.slots.split(",")):
    print(f"mask head + loss, forward + backward, {slots} RoIs: "
          f"{mask_head_seconds(slots, args.runs):.2f} s")


if __name__ == "__main__":
  main()
