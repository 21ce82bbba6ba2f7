"""One Mask R-CNN R50-FPN training step, ours (the step train.py runs) vs torchvision, on CPU.

Ours is the production step: `parallel.make_parallel_step(parallel.make_train_step(...))` (shard_map
over one device, gradients of the trained leaves, cross-device mean, the optimizer of
`optimizer.make_optimizer`), fed a device batch as train.py feeds it.

Same starting weights: torchvision's `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`
random init with every BatchNorm2d replaced by a FrozenBatchNorm2d (the usual fine-tuning setting,
and what our backbone always is) whose statistics are computed once on the batch (see
`frozen_bn_torchvision`: needed so that SGD at lr 0.01 does not diverge), converted with
`convert.from_torchvision` into torchvision's R50-FPN config (`torchvision_model_config(50)`). All
layers are trained on both sides (torchvision's `trainable_layers=5`, its default without pretrained
weights); the frozen BatchNorm terms are buffers on both sides.

Same batch: 2 images of random content, 512 x 512, each with 2-5 random boxes and elliptical masks.
torchvision gets `min_size=512, max_size=512` (no resize; padded to 512, a multiple of 32), [0, 1]
images and full-image uint8 masks; ours gets the images normalized as torchvision's transform does
(512 x 512 canvas), ground truth padded to 100 instances and 112 x 112 mask crops made as the data
pipeline makes them (`roi_align(mask, box, 112, 1, sampling_ratio=1, aligned=True)`).

Same optimizer: SGD, lr 0.01, momentum 0.9, weight decay 1e-4 on every trained parameter
(torch.optim.SGD; optax add_decayed_weights + sgd(momentum), the same update). The loss is the sum
of the five losses on both sides. The same batch is fed at every step; the sampling key changes.

Measured, each side in its own subprocess (inputs and weights written to a temporary directory by a
third; our process never imports torch), torch with 2 threads and flush-to-zero, jax with its
default CPU client:
  * ours: compile time (first call minus the steady-state median), steady-state median wall and CPU
    time per step over the steps after the first and --warmup more, compilations of the step over
    all --ours-steps calls (the jitted step's cache size: must be exactly 1), donation of
    the state (the previous state's buffers are deleted after each call);
  * torchvision: first step and steady-state median over --torch-steps after the first and --warmup;
  * peak resident memory of each process (VmHWM: whole run, our compilation included), split into
    the first step and the later ones (VmHWM reset with clear_refs after the first), and the
    resident memory before the first step;
  * foreground RoIs per image at each step: torchvision's mask head runs on exactly those, ours on
    a fixed 128 slots per image (positives first), so early steps favour torchvision.

Usage: python benchmarks/bench_train.py [--ours-steps 20] [--torch-steps 6] [--warmup 1]
(~12-14 minutes with the defaults on a 2-core machine; fewer --ours-steps for a quick look.)
Prints a table with ratios ours / torchvision and markdown rows for benchmarks/RESULTS.md.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (benchmarks/_common.py, numpy only)

_common.add_repo_to_path()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

TORCH_THREADS = 2
SIZE = 512
BATCH = 2
MAX_INSTANCES = 100
CROP = 112
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
MASK_ROIS = 128  # torchvision_model_config's mask_sampler.num_rois
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # torchvision's GeneralizedRCNNTransform
STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------------------------
# Inputs (child "inputs": torch only)


def frozen_bn_torchvision(images, seed: int = 0):
  """torchvision R50-FPN Mask R-CNN from its random init, BatchNorm2d -> FrozenBatchNorm2d.

  The frozen statistics are those of `images` (one forward in training mode with momentum 1) and the
  last BatchNorm of every residual branch scales by 0.2, so activations stay O(1) through the 16
  blocks, as in a pretrained backbone. From the untouched init (identity statistics) or the
  randomized ones of `tests/reference/tv_models`, SGD at lr 0.01 diverges to NaN within two steps
  (torchvision: losses ~1e10 at step 2), and a NaN step is not the computation to time
  (torchvision's
  step time dropped from ~18 s to ~10 s once NaN).

  Args:
    images: list of [3, H, W] float tensors in [0, 1].
  """
  import torch
  from torchvision.models.detection import maskrcnn_resnet50_fpn
  torch.manual_seed(seed)
  m = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)  # BatchNorm2d, trainable_layers=5
  with torch.no_grad():
    for name, bn in m.named_modules():
      if isinstance(bn, torch.nn.BatchNorm2d):
        bn.reset_running_stats()
        bn.momentum = 1.0
        if name.endswith("bn3"):
          bn.weight.fill_(0.2)
  m.train()
  with torch.no_grad():
    image_list, _ = m.transform(images)
    m.backbone(image_list.tensors)
  return _swap_frozen(m, copy=True)


def _swap_frozen(module, copy: bool):
  """Replaces every BatchNorm2d below `module` by a FrozenBatchNorm2d (with its buffers if copy)."""
  import torch
  from torchvision.ops.misc import FrozenBatchNorm2d
  for name, child in module.named_children():
    if isinstance(child, torch.nn.BatchNorm2d):
      frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
      if copy:
        with torch.no_grad():
          for buf in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, buf).copy_(getattr(child, buf).detach())
      setattr(module, name, frozen)
    else:
      _swap_frozen(child, copy)
  return module


def make_batch(seed: int = 0):
  """Random images in [0, 1], 2-5 random boxes per image with inscribed ellipse masks."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
  boxes, labels, masks = [], [], []
  yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
  for b in range(BATCH):
    n = int(rng.integers(2, 6))
    wh = rng.uniform(32, 256, (n, 2))
    xy = rng.uniform(0, SIZE - wh)
    bx = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    c = (bx[:, :2] + bx[:, 2:]) / 2
    r = (bx[:, 2:] - bx[:, :2]) / 2
    mk = ((((xx[None] - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2
           + ((yy[None] - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2) <= 1).astype(np.uint8)
    boxes.append(bx)
    labels.append(rng.integers(1, 91, n).astype(np.int64))
    masks.append(mk)
  return images, boxes, labels, masks


def write_inputs(out_dir: str) -> dict:
  import torch
  import torchvision  # noqa: F401
  from torchvision.ops import roi_align
  torch.set_num_threads(TORCH_THREADS)
  images, boxes, labels, masks = make_batch()
  tv = frozen_bn_torchvision([torch.from_numpy(im).permute(2, 0, 1) for im in images])
  sd = tv.state_dict()
  torch.save(sd, os.path.join(out_dir, "tv.pth"))
  # Our side reads the same tensors from numpy, so torch never loads into its process.
  np.savez(os.path.join(out_dir, "tv_weights.npz"), **{k: v.numpy() for k, v in sd.items()})
  gt_boxes = np.zeros((BATCH, MAX_INSTANCES, 4), np.float32)
  gt_classes = np.zeros((BATCH, MAX_INSTANCES), np.int32)
  gt_valid = np.zeros((BATCH, MAX_INSTANCES), bool)
  gt_masks = np.zeros((BATCH, MAX_INSTANCES, CROP, CROP), np.float32)
  arrays = {"images": images}
  for b in range(BATCH):
    n = len(boxes[b])
    gt_boxes[b, :n], gt_classes[b, :n], gt_valid[b, :n] = boxes[b], labels[b], True
    rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.from_numpy(boxes[b])], 1)
    gt_masks[b, :n] = roi_align(torch.from_numpy(masks[b]).float()[:, None], rois, CROP, 1.0, 1,
                                True)[:, 0].numpy()
    arrays[f"boxes{b}"], arrays[f"labels{b}"], arrays[f"masks{b}"] = boxes[b], labels[b], masks[b]
  arrays.update(gt_boxes=gt_boxes, gt_classes=gt_classes, gt_valid=gt_valid, gt_masks=gt_masks)
  np.savez(os.path.join(out_dir, "batch.npz"), **arrays)
  return {"instances": [len(b) for b in boxes]}


# ----------------------------------------------------------------------------------------------
# The two sides (children "ours" and "torch")


def run_steps(step, steps: int) -> dict:
  """Calls step(i) `steps` times: wall times, results, resident memory before the first call, the
  peak over the first call, and the peak over the rest (VmHWM reset after the first call)."""
  mem = dict(rss_before=_common.proc_status_mb("VmRSS"), first_peak_rss=None, steady_peak_rss=None)
  times, cpu, results = [], [], []
  for i in range(steps):
    if i == 1:
      mem["first_peak_rss"] = _common.proc_status_mb("VmHWM")
      if not _common.reset_peak_rss():
        mem["first_peak_rss"] = None
    start, start_cpu = time.perf_counter(), time.process_time()
    results.append(step(i))
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  if steps > 1 and mem["first_peak_rss"] is not None:
    mem["steady_peak_rss"] = _common.proc_status_mb("VmHWM")
  mem["peak_rss"] = max(mem["first_peak_rss"] or 0.0, _common.proc_status_mb("VmHWM") or 0.0)
  return dict(times=times, cpu=cpu, results=results, **mem)


def run_torch(in_dir: str, steps: int, warmup: int) -> dict:
  import torch
  import torchvision  # noqa: F401
  torch.set_num_threads(TORCH_THREADS)
  torch.set_flush_denormal(True)  # as XLA's CPU code runs; it can only make torchvision faster
  torch.manual_seed(0)
  tv = frozen_bn_torchvision_structure(min_size=SIZE, max_size=SIZE)
  tv.load_state_dict(torch.load(os.path.join(in_dir, "tv.pth"), weights_only=True))
  tv.train()
  data = np.load(os.path.join(in_dir, "batch.npz"))
  images = [torch.from_numpy(data["images"][b]).permute(2, 0, 1).contiguous() for b in range(BATCH)]
  targets = [dict(boxes=torch.from_numpy(data[f"boxes{b}"]),
                  labels=torch.from_numpy(data[f"labels{b}"]),
                  masks=torch.from_numpy(data[f"masks{b}"])) for b in range(BATCH)]
  positives = []  # foreground RoIs per image of each step: the mask head's batch
  select = tv.roi_heads.select_training_samples

  def counting_select(proposals, targets):
    out = select(proposals, targets)
    positives.append([int((labels > 0).sum()) for labels in out[2]])
    return out

  tv.roi_heads.select_training_samples = counting_select
  params = [p for p in tv.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  n_trained = sum(p.numel() for p in params)

  def step(i):
    losses = tv(images, targets)
    loss = sum(losses[k] for k in LOSS_NAMES)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    out = {k: float(v) for k, v in losses.items()}
    out["num_fg_rois"] = float(np.mean(positives[-1]))
    return out

  r = run_steps(step, steps)
  times, cpu, history = r.pop("times"), r.pop("cpu"), r.pop("results")
  steady = times[1 + warmup:] or times[1:] or times
  steady_cpu = cpu[1 + warmup:] or cpu[1:] or cpu
  return dict(times=times, first=times[0], median=_common.median(steady),
              spread=_common.spread(steady), cpu_median=_common.median(steady_cpu),
              losses_first=history[0], losses_last=history[-1],
              fg_rois=[h["num_fg_rois"] for h in history], n_trained=n_trained, **r)


def frozen_bn_torchvision_structure(**kwargs):
  """The module tree of `frozen_bn_torchvision` (weights to be loaded), with MaskRCNN kwargs."""
  from torchvision.models.detection import maskrcnn_resnet50_fpn
  return _swap_frozen(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs), False)


def run_ours(in_dir: str, steps: int, warmup: int, remat: bool = False) -> dict:
  """The step train.py runs: `parallel.make_parallel_step(parallel.make_train_step(...))` (one
  device), with the production optimizer (`optimizer.make_optimizer`) set to the same recipe."""
  import jax
  import ml_collections

  from maskrcnn_jax.convert.torchvision import from_torchvision
  from maskrcnn_jax.modeling.builder import torchvision_model_config
  from maskrcnn_jax.training import optimizer, parallel
  from maskrcnn_jax.training.train_state import TrainState

  with np.load(os.path.join(in_dir, "tv_weights.npz")) as f:
    state_dict = {k: f[k] for k in f.files}
  model_config = torchvision_model_config(50)
  model_config.backbone.remat = bool(remat)
  model, variables = from_torchvision(state_dict, model_config=model_config)
  del state_dict
  data = np.load(os.path.join(in_dir, "batch.npz"))
  images = ((data["images"] - MEAN) / STD).astype(np.float32)
  batch = dict(image=images, image_size=np.full((BATCH, 2), SIZE, np.int32),
               gt_boxes=data["gt_boxes"], gt_classes=data["gt_classes"],
               gt_valid=data["gt_valid"], gt_masks=data["gt_masks"],
               crowd_boxes=np.zeros((BATCH, 1, 4), np.float32),
               crowd_valid=np.zeros((BATCH, 1), bool))
  # torch.optim.SGD(lr, momentum, weight_decay) on every trained parameter, biases included.
  training = ml_collections.ConfigDict(dict(
      learning_rate=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
      weight_decay_norm_and_bias=True, warmup_steps=0, schedule="step", decay_steps=(),
      steps=steps, clip_grad_norm=0.0, frozen_stages=0))
  tx = optimizer.make_optimizer(training, variables["params"])
  mesh = parallel.make_mesh(jax.devices()[:1])
  step = parallel.make_parallel_step(
      parallel.make_train_step(model, tx, optimizer.learning_rate_schedule(training),
                               optimizer.trainable_mask(variables["params"], 0)), mesh)
  n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  holder = dict(state=parallel.replicate(TrainState.create(variables, tx), mesh), donated=True)
  del variables
  device_batch = parallel.global_batch(batch, mesh, model.batch_keys)

  def one(i):
    old_leaf = jax.tree.leaves(holder["state"].params)[0]
    holder["state"], out = step(holder["state"], device_batch)
    jax.block_until_ready((holder["state"], out))
    holder["donated"] &= old_leaf.is_deleted()
    return {k: float(v) for k, v in out.items()}

  r = run_steps(one, steps)
  times, cpu, history = r.pop("times"), r.pop("cpu"), r.pop("results")
  steady = times[1 + warmup:] or times[1:] or times
  steady_cpu = cpu[1 + warmup:] or cpu[1:] or cpu
  median = _common.median(steady)
  return dict(times=times, first=times[0], median=median, spread=_common.spread(steady),
              cpu_median=_common.median(steady_cpu), compile=times[0] - median,
              fg_rois=[h["num_fg_rois"] for h in history], traces=step._cache_size(),
              donated=bool(holder["donated"]),
              losses_first=history[0], losses_last=history[-1], n_trained=n_trained,
              jax_version=jax.__version__,
              finite=bool(all(np.isfinite(v) for h in history for v in h.values())), **r)


def child_main(args) -> None:
  if args.child == "inputs":
    result = write_inputs(args.dir)
  elif args.child == "torch":
    result = run_torch(args.dir, args.torch_steps, args.warmup)
  else:
    result = run_ours(args.dir, args.ours_steps, args.warmup, args.remat)
  print(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Parent: orchestrates the children, prints the table


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--child", choices=("inputs", "ours", "torch"))
  p.add_argument("--dir")
  p.add_argument("--ours-steps", type=int, default=20,
                 help="our steps in all (first = compile); traces are counted over all of them")
  p.add_argument("--torch-steps", type=int, default=6, help="torchvision steps in all")
  p.add_argument("--warmup", type=int, default=1, help="steps after the first left out of medians")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--remat", action="store_true",
                 help="ours with backbone.remat (blocks recomputed in the backward pass)")
  args = p.parse_args()
  if args.child:
    child_main(args)
    return

  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as d:
    script = os.path.abspath(__file__)
    common = ["--dir", d, "--ours-steps", str(args.ours_steps), "--torch-steps",
              str(args.torch_steps), "--warmup", str(args.warmup)]
    if args.remat:
      common.append("--remat")
    info = _common.run_json_child([script, "--child", "inputs"] + common)
    ours = _common.run_json_child([script, "--child", "ours"] + common)
    tv = None if args.skip_torch else _common.run_json_child([script, "--child", "torch"] + common)
  total = time.perf_counter() - start
  report(args, info, ours, tv, total)


def report(args, info, ours, tv, total) -> None:
  def ratio(a, b):
    return f"{a / b:.2f}x" if (a is not None and b) else "-"

  print(f"Mask R-CNN R50-FPN training step, batch {BATCH} at {SIZE}x{SIZE}, instances per image "
        f"{info['instances']}, SGD lr {LR} momentum {MOMENTUM} wd {WEIGHT_DECAY}, all layers "
        f"trained ({ours['n_trained'] / 1e6:.1f} M parameters ours"
        + (f", {tv['n_trained'] / 1e6:.1f} M torchvision" if tv else "") + "), frozen BatchNorm")
  print(f"{platform.processor() or platform.machine()}, {_common.load_average()}, "
        f"torch threads {TORCH_THREADS}, jax {ours['jax_version']}")
  rows = [
      ("step time, steady median (s)", ours["median"], tv and tv["median"]),
      ("step CPU time, steady median (s)", ours["cpu_median"], tv and tv["cpu_median"]),
      ("first step (s)", ours["first"], tv and tv["first"]),
      ("compile (s) = first - median", ours["compile"], None),
      ("peak RSS, whole process (MB)", ours["peak_rss"], tv and tv["peak_rss"]),
      ("peak RSS, first step (MB)", ours["first_peak_rss"], tv and tv["first_peak_rss"]),
      ("peak RSS, later steps (MB)", ours["steady_peak_rss"], tv and tv["steady_peak_rss"]),
      ("RSS before first step (MB)", ours["rss_before"], tv and tv["rss_before"]),
  ]
  print(f"{'':34s} {'ours':>10s} {'torchvision':>12s} {'ratio':>8s}")
  for name, a, b in rows:
    fa = f"{a:10.2f}" if a is not None else f"{'-':>10s}"
    fb = f"{b:12.2f}" if b is not None else f"{'-':>12s}"
    print(f"{name:34s} {fa} {fb} {ratio(a, b) if b is not None else '-':>8s}")
  print(f"ours: {args.ours_steps} steps, traces {ours['traces']} (goal 1), state donated "
        f"{ours['donated']}, losses finite {ours['finite']}, step spread "
        f"{ours['spread']:.2f}; times " + " ".join(f"{t:.2f}" for t in ours["times"]))
  if tv:
    print(f"torchvision: {args.torch_steps} steps, spread {tv['spread']:.2f}; times "
          + " ".join(f"{t:.2f}" for t in tv["times"]))
  for side, r in (("ours", ours), ("torchvision", tv)):
    if r:
      print(f"{side} foreground RoIs per image (the mask-head batch; ours runs the smallest "
            f"of mask_head.train_buckets or {MASK_ROIS} slots holding them): "
            + " ".join(f"{x:.0f}" for x in r["fg_rois"]))
  for side, r in (("ours", ours), ("torchvision", tv)):
    if r:
      print(f"{side} losses, first step: " + ", ".join(
          f"{k[5:]} {r['losses_first'][k]:.3f}" for k in LOSS_NAMES) + "; last step: " + ", ".join(
              f"{k[5:]} {r['losses_last'][k]:.3f}" for k in LOSS_NAMES))
  goals = [f"step <= 1.15x torchvision: {ratio(ours['median'], tv and tv['median'])}",
           f"peak memory <= 1.3x torchvision: {ratio(ours['peak_rss'], tv and tv['peak_rss'])}",
           f"compile <= 60 s: {ours['compile']:.1f} s", f"one compile: {ours['traces']} trace(s)"]
  print("goals: " + "; ".join(goals))
  print(f"total benchmark time {total:.0f} s")
  if tv:
    print("\nmarkdown for benchmarks/RESULTS.md:")
    print(f"| training step R50-FPN, batch 2, 512x512, SGD (`bench_train.py`) | "
          f"{ours['median']:.2f} s (compile {ours['compile']:.0f} s, {ours['traces']} trace in "
          f"{args.ours_steps} steps) | {tv['median']:.2f} s | "
          f"{ours['median'] / tv['median']:.2f}x | <= 1.15x |")
    print(f"| training peak RSS (subprocess each) | {ours['peak_rss']:.0f} MB | "
          f"{tv['peak_rss']:.0f} MB | {ours['peak_rss'] / tv['peak_rss']:.2f}x | <= 1.3x |")


if __name__ == "__main__":
  main()
