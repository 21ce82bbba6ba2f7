"""One command for any backend (CPU, GPU, TPU): inference and training throughput, compile times,
peak device memory and MFU of the production programs.

    python benchmarks/bench_device.py [--config configs/r50_fpn_coco.py] [--canvas 1024]
        [--infer_batches 1,8] [--train_batch 2] [--runs 5] [--small] [--json out.json]

On the default backend (whatever `jax.devices()[0]` is), with random weights and synthetic inputs:
  * inference: the jitted forward pass `maskrcnn_jax.predict` runs (detections and mask
    probabilities on the canvas; the host-side paste is not timed), at each batch size of
    --infer_batches: compile seconds, then images/s over --runs calls after a warm-up call;
  * training: the step train.py runs (gradients, cross-device mean, optimizer update; one device,
    --train_batch images): compile seconds, images/s over --runs steps after a warm-up;
  * FLOPs per image from XLA's cost analysis of each compiled program, achieved TFLOP/s, and MFU
    = achieved / the device's peak (bfloat16 dense peak from the table below for known GPUs and
    TPUs; none on CPU, where MFU is left blank);
  * peak device memory (`device.memory_stats()['peak_bytes_in_use']` where the backend reports
    it, else the process's peak resident memory, marked "(RSS)").
--small runs configs/tiny.py at 128 px with 3 timed runs (what the test suite runs on CPU).
Prints a Markdown table (and writes --json).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _programs  # noqa: E402

_common.add_repo_to_path()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Dense bfloat16 peak FLOP/s per device (vendor figures, without sparsity), by a substring of
# `device.device_kind`; first match wins (more specific names first).
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 45e12),
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("A10G", 70e12),
    ("L40S", 362e12), ("L4", 121e12), ("V100", 125e12), ("T4", 65e12),
)


def peak_flops(device_kind: str):
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def peak_memory(device):
  """(bytes, source): the device's peak bytes in use, or the process's peak RSS."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 (not every backend implements it)
    pass
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  return int(_common.maxrss_mb() * 2 ** 20), "RSS"


def measure(fn, args, runs: int, images: int, block):
  """(compile s, images/s, FLOPs per image) of jitted `fn` on `args`."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  flops = cost.get("flops")
  out = compiled(*args)  # warm-up
  block(out)
  args = block.next_args(out, args)
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    out = compiled(*args)
    block(out)
    times.append(time.perf_counter() - t)
    args = block.next_args(out, args)
  step = _common.median(times)
  return compile_s, images / step, (flops / images if flops else None)


class _Block:
  """Waits for a result; for a training step also feeds the new state back (it is donated)."""

  def __init__(self, train: bool):
    self.train = train

  def __call__(self, out):
    import jax
    jax.block_until_ready(out)

  def next_args(self, out, args):
    return (out[0],) + tuple(args[1:]) if self.train else args


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(_common.REPO_ROOT, "configs", "r50_fpn_coco.py"))
  p.add_argument("--canvas", type=int, default=None)
  p.add_argument("--infer_batches", default=None, help="default 1,8 (--small: 1,2)")
  p.add_argument("--train_batch", type=int, default=2)
  p.add_argument("--runs", type=int, default=None, help="default 5 (--small: 3)")
  p.add_argument("--small", action="store_true",
                 help="configs/tiny.py at 128 px, 3 runs, inference at batch 1 and 2 (flags "
                      "given explicitly still apply)")
  p.add_argument("--json", default="")
  args = p.parse_args()
  small = dict(canvas=128, runs=3, infer_batches="1,2") if args.small else {}
  if args.small:
    args.config = os.path.join(_common.REPO_ROOT, "configs", "tiny.py")
  for key, default in dict(canvas=0, runs=5, infer_batches="1,8").items():
    if getattr(args, key) is None:
      setattr(args, key, small.get(key, default))
  import jax
  device = jax.devices()[0]
  peak = peak_flops(device.device_kind)
  config = _programs.load_config(args.config, args.canvas)
  rows = []
  for b in [int(x) for x in args.infer_batches.split(",") if x]:
    fn, fargs = _programs.forward(config, b)
    rows.append(("inference", b) + measure(fn, fargs, args.runs, b, _Block(False)))
  fn, fargs = _programs.train_step(config, args.train_batch)
  rows.append(("training", args.train_batch)
              + measure(fn, fargs, args.runs, args.train_batch, _Block(True)))
  mem, source = peak_memory(device)
  print(f"device: {device.platform} {device.device_kind} ({jax.device_count()} device(s); one "
        f"used), config {os.path.relpath(args.config, _common.REPO_ROOT)}, canvas "
        f"{tuple(config.data.image_size)}, peak "
        + (f"{peak / 1e12:.0f} TFLOP/s bf16" if peak else "FLOP/s unknown (no MFU)"))
  print("\n| program | batch | compile s | images/s | GFLOP/image | TFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|")
  records = []
  for what, b, compile_s, ips, flops in rows:
    achieved = flops * ips if flops else None
    mfu = achieved / peak if achieved and peak else None
    print(f"| {what} | {b} | {compile_s:.1f} | {ips:.2f} | "
          f"{'-' if flops is None else f'{flops / 1e9:.1f}'} | "
          f"{'-' if achieved is None else f'{achieved / 1e12:.3f}'} | "
          f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} |")
    records.append(dict(program=what, batch=b, compile_s=compile_s, images_per_s=ips,
                        flops_per_image=flops, mfu=mfu))
  print(f"\npeak memory: {mem / 2 ** 30:.2f} GiB ({source})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=device.device_kind, platform=device.platform, rows=records,
                     peak_memory_bytes=mem, peak_memory_source=source), f, indent=1)


if __name__ == "__main__":
  main()
