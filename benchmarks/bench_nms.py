"""NMS speed: maskrcnn_jax.ops.nms (jitted) vs torchvision.ops.nms on CPU, same process, same boxes.

Clustered random boxes (heavy overlap, as RPN proposals and detections are) at N = 1000, 2000, 5000,
IoU 0.7 (RPN) and 0.5 (detector); ours with max_output = N (the whole greedy pass, as torchvision
always does). Also the two shapes the model runs: the RPN's `vmap` over 5 levels of 2000 boxes
(max_output 1000, vs 5 torchvision calls) and the detector's `batched_nms` of 5000 candidates over
90 classes to 100. Each timing is the median of `--runs` after one warm-up, with block_until_ready.

Usage: python benchmarks/bench_nms.py [--runs 5]
"""
import argparse
import functools
import os
import sys
import time

import numpy as np

THREADS = 2


def clustered_boxes(rng, n):
  """[n, 4] float32 (x1, y1, x2, y2) boxes in an 800 x 1216 image around n / 25 centres."""
  k = max(1, n // 25)
  centres = rng.uniform([0, 0], [1216, 800], (k, 2))
  sizes = np.exp(rng.uniform(np.log(16), np.log(400), (k, 2)))
  which = rng.integers(0, k, n)
  ctr = centres[which] + rng.normal(0, 0.15, (n, 2)) * sizes[which]
  wh = sizes[which] * rng.uniform(0.6, 1.4, (n, 2))
  return np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)


def median_time(fn, runs: int) -> float:
  """Seconds: median of `runs` calls of `fn` after one warm-up call."""
  fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=5)
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  import torch
  import torchvision

  from maskrcnn_jax.ops.nms import batched_nms, nms

  torch.set_num_threads(THREADS)
  rng = np.random.default_rng(0)
  cases = []  # (name, ours closure, torchvision closure, kept by torchvision)

  for n in (1000, 2000, 5000):
    for iou in (0.7, 0.5):
      boxes, scores = clustered_boxes(rng, n), rng.random(n).astype(np.float32)
      run = jax.jit(functools.partial(nms, iou_threshold=iou, max_output=n))
      b, s = jax.device_put(boxes), jax.device_put(scores)
      tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
      kept = len(torchvision.ops.nms(tb, ts, iou))
      cases.append((f"nms N={n} iou={iou}",
                    lambda run=run, b=b, s=s: jax.block_until_ready(run(b, s)),
                    lambda tb=tb, ts=ts, iou=iou: torchvision.ops.nms(tb, ts, iou), kept))

  # RPN: 5 levels x 2000, vmapped, 1000 slots per level.
  boxes = np.stack([clustered_boxes(rng, 2000) for _ in range(5)])
  scores = rng.random((5, 2000)).astype(np.float32)
  run = jax.jit(jax.vmap(functools.partial(nms, iou_threshold=0.7, max_output=1000)))
  b, s = jax.device_put(boxes), jax.device_put(scores)
  tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
  kept = sum(min(1000, len(torchvision.ops.nms(tb[i], ts[i], 0.7))) for i in range(5))
  cases.append(("rpn vmap 5x2000 iou=0.7 -> 1000",
                lambda run=run, b=b, s=s: jax.block_until_ready(run(b, s)),
                lambda tb=tb, ts=ts: [torchvision.ops.nms(tb[i], ts[i], 0.7) for i in range(5)],
                kept))

  # Detector: 5000 class-specific candidates, 90 classes, top 100 (torchvision: per-class loop).
  boxes, scores = clustered_boxes(rng, 5000), rng.random(5000).astype(np.float32)
  classes = rng.integers(1, 91, 5000).astype(np.int32)
  run_b = jax.jit(functools.partial(batched_nms, iou_threshold=0.5, max_output=100))
  b, s, c = jax.device_put(boxes), jax.device_put(scores), jax.device_put(classes)
  tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
  tc = torch.from_numpy(classes.astype(np.int64))
  kept = len(torchvision.ops.batched_nms(tb, ts, tc, 0.5))
  cases.append(("batched 5000, 90 cls, iou=0.5 -> 100",
                lambda b=b, s=s, c=c: jax.block_until_ready(run_b(b, s, c)),
                lambda tb=tb, ts=ts, tc=tc: torchvision.ops.batched_nms(tb, ts, tc, 0.5)[:100],
                kept))

  print(f"NMS, clustered boxes; median of {args.runs} after warm-up; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch {torch.__version__} ({THREADS} threads)")
  print(f"{'case':38s} {'kept (tv)':>9s} {'ours ms':>9s} {'tv ms':>9s} {'ours/tv':>8s}")
  for name, ours, theirs, kept in cases:
    t_ours, t_tv = median_time(ours, args.runs), median_time(theirs, args.runs)
    print(f"{name:38s} {kept:9d} {t_ours * 1e3:9.2f} {t_tv * 1e3:9.2f} {t_ours / t_tv:8.2f}")


if __name__ == "__main__":
  main()
