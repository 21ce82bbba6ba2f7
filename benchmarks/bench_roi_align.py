"""RoIAlign speed and memory: maskrcnn_jax.ops.roi_align vs torchvision.ops.roi_align on CPU.

Same process, same inputs: a 256 x 200 x 304 stride-4 map (ours NHWC, torchvision NCHW) of an
800 x 1216 image, 1000 boxes of realistic sizes, 7x7 crops, sampling_ratio 2, aligned False.
Forward, and forward + backward (gradient of sum(output * fixed random cotangent) w.r.t. the
features), each timed after a warm-up as the median of several runs, the two sides interleaved so
that load from other processes hits both alike. Memory is measured for each side in its own
subprocess from /proc/self/status (resident memory sees XLA's allocations; tracemalloc would not).

`--variant` times one of the other RoI layers on the same inputs: `adaptive` (roi_align with
sampling_ratio=0, ours capped at `MAX_SAMPLES` samples per bin side, vs torchvision's uncapped
adaptive roi_align) or `pool` (roi_pool vs torchvision.ops.roi_pool; ours reads bins of up to
`--max-bin-size` pixels per side exactly and subsamples larger ones, which FPN level mapping
avoids but this single stride-4 map does not: the script prints how many boxes that affects).

Usage: python benchmarks/bench_roi_align.py [--runs 7] [--no-memory] [--variant align]
Prints a table and one line for benchmarks/RESULTS.md.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import proc_status_mb  # noqa: E402

IMAGE_H, IMAGE_W = 800, 1216
SCALE = 0.25
CHANNELS = 256
NUM_BOXES = 1000
OUTPUT_SIZE = 7
SAMPLING_RATIO = 2
ALIGNED = False
THREADS = 2
VARIANTS = ("align", "adaptive", "pool")


def make_inputs(seed: int = 0):
  """Returns features [H, W, C], boxes [N, 4] (x1, y1, x2, y2) pixels, cotangent [N, S, S, C].

  All float32, from a fixed seed.
  """
  rng = np.random.default_rng(seed)
  features = rng.standard_normal(
      (int(IMAGE_H * SCALE), int(IMAGE_W * SCALE), CHANNELS)).astype(np.float32)
  # Box sides: sqrt(area) log-uniform in [16, 512] px, aspect ratio log-uniform in [1/3, 3].
  side = np.exp(rng.uniform(np.log(16), np.log(512), NUM_BOXES))
  ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3), NUM_BOXES))
  w, h = side * np.sqrt(ratio), side / np.sqrt(ratio)
  cx, cy = rng.uniform(0, IMAGE_W, NUM_BOXES), rng.uniform(0, IMAGE_H, NUM_BOXES)
  boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
  boxes = np.clip(boxes, 0, [IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H]).astype(np.float32)
  cotangent = rng.standard_normal(
      (NUM_BOXES, OUTPUT_SIZE, OUTPUT_SIZE, CHANNELS)).astype(np.float32)
  return features, boxes, cotangent


def interleaved_medians(fns: dict, runs: int) -> dict:
  """Seconds per call: `{name: median}` of `runs` calls of each fn after one warm-up call each.

  The calls are interleaved (one of each per round) so that load from other processes on the
  machine hits every side alike.
  """
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def jax_fns(features, boxes, cotangent, variant="align", max_bin_size=8):
  """Returns (forward, forward_backward, XLA temp MB of forward_backward) for ours.

  Both closures are compiled ahead of time (so that a first call only runs) and block until done.
  """
  import jax
  import jax.numpy as jnp

  from maskrcnn_jax.ops.roi_align import roi_align
  from maskrcnn_jax.ops.roi_pool import roi_pool

  f, b, ct = jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(cotangent)
  pool = {
      "align": lambda x, b: roi_align(x, b, OUTPUT_SIZE, SCALE, SAMPLING_RATIO, ALIGNED),
      "adaptive": lambda x, b: roi_align(x, b, OUTPUT_SIZE, SCALE, 0, ALIGNED),
      "pool": lambda x, b: roi_pool(x, b, OUTPUT_SIZE, SCALE, max_bin_size=max_bin_size),
  }[variant]
  # Boxes and cotangent are arguments, not closed-over constants that XLA would fold.
  forward = jax.jit(pool).lower(f, b).compile()
  # value_and_grad: the loss needs the forward pass (a bare grad of a linear op would skip it).
  loss = lambda x, b, ct: jnp.sum(pool(x, b) * ct)
  grad = jax.jit(jax.value_and_grad(loss)).lower(f, b, ct).compile()
  analysis = grad.memory_analysis()
  temp_mb = None if analysis is None else analysis.temp_size_in_bytes / 2**20
  return (lambda: forward(f, b).block_until_ready(),
          lambda: jax.block_until_ready(grad(f, b, ct)), temp_mb)


def torch_fns(features, boxes, cotangent, variant="align", max_bin_size=None):
  """Returns (forward, forward_backward) closures for torchvision."""
  import torch
  import torchvision

  torch.set_num_threads(THREADS)
  f = torch.from_numpy(features).permute(2, 0, 1)[None].contiguous()
  rois = [torch.from_numpy(boxes)]
  ct = torch.from_numpy(cotangent).permute(0, 3, 1, 2).contiguous()
  pool = {
      "align": lambda x: torchvision.ops.roi_align(x, rois, OUTPUT_SIZE, SCALE, SAMPLING_RATIO,
                                                   ALIGNED),
      "adaptive": lambda x: torchvision.ops.roi_align(x, rois, OUTPUT_SIZE, SCALE, 0, ALIGNED),
      "pool": lambda x: torchvision.ops.roi_pool(x, rois, OUTPUT_SIZE, SCALE),
  }[variant]

  def forward():
    with torch.no_grad():
      pool(f)

  def forward_backward():
    x = f.detach().requires_grad_()
    (pool(x) * ct).sum().backward()
    return x.grad

  return forward, forward_backward, None



def measure_memory(side: str, variant: str = "align", max_bin_size: int = 8) -> dict:
  """Child process: resident memory around forward + backward on one side, in MB.

  `peak_mb`: the peak RSS of the whole process, imports and compilation included (VmHWM; ru_maxrss
  would be inherited from the parent across exec). `run_mb`: the peak RSS of the first forward +
  backward run over the RSS just before it (the peak is reset through /proc/self/clear_refs after
  compiling ours, after a warm-up of torchvision's), i.e. the working memory of the op: its
  output, the gradient and any temporaries. `xla_temp_mb`: XLA's own count of our temporaries.
  """
  inputs = make_inputs()
  fns = (jax_fns if side == "jax" else torch_fns)(*inputs, variant, max_bin_size)
  if side == "torch":
    fns[1]()  # Warm-up: torch's first call sets things up; it returns its memory to the system.
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # Resets VmHWM to the current RSS.
    before = proc_status_mb("VmRSS")
  except OSError:
    before = None
  fns[1]()
  run = None if before is None else proc_status_mb("VmHWM") - before
  peak = proc_status_mb("VmHWM")
  if peak is None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  return {"peak_mb": peak, "run_mb": run, "xla_temp_mb": fns[2]}


def memory_in_subprocess(side: str, variant: str = "align", max_bin_size: int = 8) -> dict:
  out = subprocess.run([sys.executable, __file__, "--memory-child", side, "--variant", variant,
                        "--max-bin-size", str(max_bin_size)], check=True,
                       capture_output=True, text=True, env=dict(os.environ)).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--no-memory", action="store_true")
  parser.add_argument("--memory-child", choices=["jax", "torch"])
  parser.add_argument("--variant", choices=VARIANTS, default="align")
  parser.add_argument("--max-bin-size", type=int, default=8, help="roi_pool's window (pool)")
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  variant, window = args.variant, args.max_bin_size
  if args.memory_child:
    print(json.dumps(measure_memory(args.memory_child, variant, window)))
    return

  memory = None
  if not args.no_memory:  # First, while this process is still small.
    memory = {"ours": memory_in_subprocess("jax", variant, window),
              "torchvision": memory_in_subprocess("torch", variant, window)}

  import jax
  inputs = make_inputs()
  ours = jax_fns(*inputs, variant, window)
  theirs = torch_fns(*inputs, variant)
  medians = interleaved_medians({(name, step): fns[step] for name, fns in (
      ("ours", ours), ("torchvision", theirs)) for step in (0, 1)}, args.runs)
  times = {name: [medians[(name, 0)], medians[(name, 1)]] for name in ("ours", "torchvision")}

  label = {"align": f"RoIAlign, sampling {SAMPLING_RATIO}",
           "adaptive": "RoIAlign, adaptive sampling (sampling_ratio=0)",
           "pool": f"RoIPool, bins read exactly up to {window} px"}[variant]
  print(f"{label}, {CHANNELS}x{int(IMAGE_H * SCALE)}x{int(IMAGE_W * SCALE)} map, "
        f"{NUM_BOXES} boxes, "
        f"{OUTPUT_SIZE}x{OUTPUT_SIZE}, aligned {ALIGNED}; "
        f"median of {args.runs}; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch threads {THREADS}")
  header = f"{'':12s} {'forward s':>10s} {'fwd+bwd s':>10s}"
  if memory:
    header += f" {'peak RSS MB':>12s} {'fwd+bwd MB':>11s}"
  print(header)
  for name in ("ours", "torchvision"):
    row = f"{name:12s} {times[name][0]:10.3f} {times[name][1]:10.3f}"
    if memory:
      m = memory[name]
      run = "n/a" if m["run_mb"] is None else f"{m['run_mb']:.0f}"
      row += f" {m['peak_mb']:12.0f} {run:>11s}"
    print(row)
  if memory:
    print("  peak RSS: whole process, imports and compilation included; fwd+bwd MB: resident "
          "memory added by the first forward + backward (output, gradient, temporaries)")
    temp = memory["ours"]["xla_temp_mb"]
    if temp is not None:
      print(f"  XLA temporaries of our forward + backward: {temp:.1f} MB")
  fwd_ratio = times["ours"][0] / times["torchvision"][0]
  bwd_ratio = times["ours"][1] / times["torchvision"][1]
  print(f"{'ours/tv':12s} {fwd_ratio:10.2f} {bwd_ratio:10.2f}")
  sides = np.maximum(inputs[1][:, 2:] - inputs[1][:, :2], 0) * SCALE  # box sides on the map
  if variant == "adaptive":
    from maskrcnn_jax.ops.roi_align import MAX_SAMPLES
    over = np.any(np.ceil(np.maximum(sides, 1) / OUTPUT_SIZE) > MAX_SAMPLES, axis=1).mean()
    print(f"  boxes needing more than {MAX_SAMPLES} samples per bin side (capped): up to "
          f"{100 * over:.0f}%")
  if variant == "pool":
    # A snapped box covers at most side + 2 pixels; a bin of b pixels touches ceil(b) + 1 rows.
    over = np.any(np.ceil((sides + 2) / OUTPUT_SIZE) + 1 > window, axis=1).mean()
    print(f"  boxes with bins over {window} px (subsampled, not exact): up to {100 * over:.0f}%")
  print()
  name = {"align": "roi_align", "adaptive": "roi_align sampling_ratio=0",
          "pool": f"roi_pool (window {window})"}[variant]
  print(f"| {name} 1000 boxes 7x7 C=256 (CPU, 2 threads) | forward {times['ours'][0]:.3f} s vs "
        f"{times['torchvision'][0]:.3f} s = {fwd_ratio:.2f}x | fwd+bwd {times['ours'][1]:.3f} s vs "
        f"{times['torchvision'][1]:.3f} s = {bwd_ratio:.2f}x |")


if __name__ == "__main__":
  main()
