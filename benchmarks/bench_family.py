"""torchvision's detection family side by side at full size: every model `from_torchvision`
converts.

For each of Faster R-CNN and Mask R-CNN, v1 and v2, and Keypoint R-CNN, on ResNet-50 and
ResNet-101 FPN backbones:
random-init torchvision weights with BatchNorm statistics randomized (`tests/reference/tv_models`),
converted by `from_torchvision(state_dict)` alone, three real photos at torchvision's input size
(short side 800, 1000 proposals), torchvision one image per call; ours in exact (multiple-of-32)
and default bucketed padding. Prints one markdown row per model and mode: detections matched
(same label, box IoU >= 0.99, |score difference| <= 1e-3), the worst box IoU and score difference,
masks with binarized IoU >= 0.98, keypoints of matched detections within 1 pixel, and the median
time per image of each side.

Usage: python benchmarks/bench_family.py [--models maskrcnn_v2-50,fasterrcnn-101] [--photos coffee]
(the suite's `tests/reference/test_family_vs_torchvision.py` runs the same check at a short side
of 320 with 300 proposals).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common  # noqa: E402  (benchmarks/_common.py, numpy only)

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

MODELS = [f"{kind}-{depth}" for kind in ("maskrcnn", "fasterrcnn", "maskrcnn_v2", "fasterrcnn_v2",
                                         "keypointrcnn")
          for depth in (50, 101)]


def run_model(kind: str, depth: int, photos, seed: int):
  import torch

  import maskrcnn_jax
  from maskrcnn_jax.convert import from_torchvision
  from tests.reference import tv_models
  tv = tv_models.build_torchvision(depth, seed, next(iter(photos.values())), kind=kind)
  model, variables = from_torchvision(tv.state_dict())
  rows = []
  refs, tv_times = {}, []
  for name, image in photos.items():
    with torch.no_grad():
      t = time.perf_counter()
      out = tv([tv_models.to_tensor(image)])[0]
      tv_times.append(time.perf_counter() - t)
    ref = {k: v.numpy() for k, v in out.items()}
    if "masks" in ref:
      ref["masks"] = ref["masks"][:, 0]
    refs[name] = ref
  for exact in (True, False):
    stats, times = [], []
    for name, image in photos.items():
      maskrcnn_jax.predict(model, variables, [image], exact_padding=exact)  # compile
      t = time.perf_counter()
      ours = maskrcnn_jax.predict(model, variables, [image], exact_padding=exact)[0]
      times.append(time.perf_counter() - t)
      stats.append(tv_models.match_detections(refs[name], ours))
    n_ref = sum(s["n_ref"] for s in stats)
    matched = sum(s["matched"] for s in stats)
    masks = ("-" if "masks" not in refs[name] else
             f"{sum(s['mask_ok_rate'] * s['matched'] for s in stats) / max(matched, 1):.4f}")
    if "keypoints" in refs[name]:
      n_kp = sum(s["n_keypoints"] for s in stats)
      ok = sum(s["keypoints_ok_rate"] * s["n_keypoints"] for s in stats)
      masks = f"keypoints {int(round(ok))}/{n_kp} within 1 px"
    rows.append(f"| {kind} R{depth} | {'exact' if exact else 'bucketed'} | {matched}/{n_ref} "
                f"({matched / max(n_ref, 1):.4f}) | {min(s['min_box_iou'] for s in stats):.6f} | "
                f"{max(s['max_score_diff'] for s in stats):.1e} | {masks} | "
                f"{_common.median(times):.2f} s | {_common.median(tv_times):.2f} s |")
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--photos", default="astronaut,coffee,chelsea")
  args = parser.parse_args()
  import torch  # noqa: F401  (torch before anything that imports TensorFlow)
  torch.set_num_threads(2)
  from tests.reference import tv_models
  all_photos = tv_models.photos()
  photos = {p: all_photos[p] for p in args.photos.split(",")}
  print("| model | padding | matched | min box IoU | max score diff | masks IoU >= 0.98 (or "
        "keypoints) | ours per image | torchvision per image |")
  print("|---|---|---|---|---|---|---|---|")
  for i, spec in enumerate(args.models.split(",")):
    kind, depth = spec.rsplit("-", 1)
    for row in run_model(kind, int(depth), photos, seed=20 + i):
      print(row, flush=True)


if __name__ == "__main__":
  main()
