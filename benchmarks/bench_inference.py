"""End-to-end inference: our Mask R-CNN vs torchvision's `maskrcnn_resnet50_fpn` on CPU.

Same weights (torchvision R50-FPN with detector-like random weights from
`tests/reference/tv_models.build_torchvision`, converted with `convert.from_torchvision`), same
photos, same process for the timings:

  * 800: skimage's coffee (400 x 600) at torchvision's defaults (min 800, max 1333): resized to
    800 x 1200, which torchvision pads to 800 x 1216, our exact mode too, our default bucketed mode
    to 896 x 1280 (multiples of 128).
  * any other size S: skimage's astronaut (512 x 512) with min_size = max_size = S on both sides.

Measured:
  1. Full inference, uint8 image in -> numpy boxes / scores / labels / full-size mask probabilities
     out (our host preprocessing and mask pasting included, torchvision's transform and postprocess
     included): median and fastest of --runs after the first call, ours (bucketed and
     exact_padding) and torchvision interleaved so load from other processes hits all alike, with
     the process's CPU seconds and the cores other processes kept busy meanwhile (from /proc/stat).
  2. Our compile time: first-call wall minus the steady-state median, with the number of traces
     (`evaluation.inference.TRACE_COUNTS`), and trace + lower vs XLA compile of the forward done
     ahead of time on a fresh jit.
  3. Memory, each side in its own subprocess (weights and photos handed over in temporary files
     written by another subprocess, so no child inherits a large parent's peak through ru_maxrss):
     peak resident memory of the process, its growth over the resident memory just before the
     first inference call (warm-up with compilation included, then --memory-runs calls), and the
     growth during further steady-state calls alone.
  4. Per-stage steady-state times of both sides, fastest of --stage-runs (each stage jitted / run on
     its own with the previous stage's outputs, our device stages timed with block_until_ready).

torch runs with 2 threads (--torch-threads); jax with its default CPU client. torch and torchvision
are imported before anything that could import TensorFlow (torchvision crashes when imported after
it). On a machine shared with other work, torch's OpenMP kernels slow down far more than XLA's
under contention: trust the ratios of runs whose "others" column is near 0.

Usage: python benchmarks/bench_inference.py [--runs 5] [--sizes 800 512] [--skip-memory]
  [--skip-stages] [--stage-runs 3] [--memory-runs 2] [--memory-sizes 800 512]
Prints a table and a markdown block for benchmarks/RESULTS.md; takes 6 to 10 minutes on the 2-core
machine, depending on its load.
"""
import argparse
import gc
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
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # Hide GPUs from TF, should anything import it.

TORCH_THREADS = 2
BUCKET = 128


# ----------------------------------------------------------------------------------------------
# Inputs and the two models


def case_for(size: int):
  """(photo name, min_size, max_size) of a --sizes entry (see the module docstring)."""
  if size == 800:
    return "coffee", 800, 1333
  return "astronaut", size, size


def write_inputs(out_dir: str, init: str = "detector") -> None:
  """Child: builds the torchvision model and writes its weights (.pth and .npz) and the photos.

  init: "detector" (detector-like random weights: 100 detections on both sides) or "plain"
  (torchvision's own random init, `maskrcnn_resnet50_fpn(weights=None)` after
  `torch.manual_seed(0)`: few detections)."""
  import torch  # noqa: F401  (torch before anything else heavy)
  import torchvision  # noqa: F401

  from tests.reference import tv_models
  if init == "plain":
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
  else:
    tv = tv_models.build_torchvision(depth=50, seed=0)
  sd = tv.state_dict()
  torch.save(sd, os.path.join(out_dir, "tv.pth"))
  np.savez(os.path.join(out_dir, "weights.npz"),
           **{k: v.detach().cpu().numpy() for k, v in sd.items()})
  photos = tv_models.photos()
  np.savez(os.path.join(out_dir, "photos.npz"), coffee=photos["coffee"],
           astronaut=photos["astronaut"])
  print(json.dumps({"ok": True}))


def load_photo(in_dir: str, name: str) -> np.ndarray:
  with np.load(os.path.join(in_dir, "photos.npz")) as f:
    return np.ascontiguousarray(f[name])


def load_torchvision(in_dir: str):
  import torch
  from torchvision.models.detection import maskrcnn_resnet50_fpn
  torch.set_num_threads(TORCH_THREADS)
  tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
  tv.load_state_dict(torch.load(os.path.join(in_dir, "tv.pth"), weights_only=True))
  return tv.eval()


def load_ours(in_dir: str):
  from maskrcnn_jax.convert import from_torchvision
  with np.load(os.path.join(in_dir, "weights.npz")) as f:
    sd = {k: f[k] for k in f.files}
  return from_torchvision(sd, backbone="resnet50")


def set_tv_sizes(tv, min_size: int, max_size: int) -> None:
  tv.transform.min_size = (min_size,)
  tv.transform.max_size = max_size


def to_tensor(image: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def tv_predict(tv, image: np.ndarray) -> dict:
  """torchvision end to end: uint8 image -> numpy results (masks as [N, H, W] probabilities)."""
  import torch
  with torch.inference_mode():
    out = tv([to_tensor(image)])[0]
  return dict(boxes=out["boxes"].numpy(), scores=out["scores"].numpy(),
              labels=out["labels"].numpy(), masks=out["masks"][:, 0].numpy())


def ours_predict(model, variables, image, min_size, max_size, exact: bool) -> dict:
  import maskrcnn_jax
  return maskrcnn_jax.predict(model, variables, [image], exact_padding=exact, min_size=min_size,
                              max_size=max_size, bucket=BUCKET)[0]


# ----------------------------------------------------------------------------------------------
# 3. Memory, in a child process per side


def memory_child(side: str, size: int, runs: int, in_dir: str) -> dict:
  if side == "torch":
    import torch  # noqa: F401
    import torchvision  # noqa: F401
  photo, min_size, max_size = case_for(size)
  image = load_photo(in_dir, photo)
  if side == "torch":
    tv = load_torchvision(in_dir)
    set_tv_sizes(tv, min_size, max_size)
    fn = lambda: tv_predict(tv, image)
  else:
    import jax  # noqa: F401
    model, variables = load_ours(in_dir)
    fn = lambda: ours_predict(model, variables, image, min_size, max_size, exact=False)
  gc.collect()
  # Loading may have peaked above what is resident now: keep that peak for the absolute figure and
  # reset the high-water mark, so that the growth below is the inference calls' alone.
  maxrss_load = _common.maxrss_mb()
  _common.reset_peak_rss()
  base = _common.proc_status_mb("VmRSS")
  fn()  # Warm-up: compiles ours.
  for _ in range(runs):
    fn()
  maxrss_infer = _common.maxrss_mb()  # Read before the next reset, which lowers it.
  steady = None
  if _common.reset_peak_rss():
    at_reset = _common.proc_status_mb("VmRSS")
    for _ in range(max(1, runs // 2)):
      fn()
    steady = _common.proc_status_mb("VmHWM") - at_reset
  return dict(base_mb=base, load_peak_mb=maxrss_load, peak_mb=max(maxrss_load, maxrss_infer),
              delta_mb=maxrss_infer - base, steady_delta_mb=steady)


def memory_in_subprocess(side: str, size: int, runs: int, in_dir: str) -> dict:
  """Runs `memory_child` in a fresh process; returns its figures (MB)."""
  return _common.run_json_child([os.path.abspath(__file__), "--child", side, "--sizes", str(size),
                                 "--runs", str(runs), "--in-dir", in_dir,
                                 "--torch-threads", str(TORCH_THREADS)])


# ----------------------------------------------------------------------------------------------
# 4. Per-stage breakdowns


def compile_split(model, variables, image, min_size, max_size, exact: bool) -> dict:
  """Seconds to trace + lower, and to XLA-compile, our forward for this image's canvas, done ahead
  of time on a fresh jit (so no cache of the earlier calls is hit)."""
  import jax
  import jax.numpy as jnp

  from maskrcnn_jax.data.preprocess import resized_size
  from maskrcnn_jax.evaluation import inference

  h, w = resized_size(*image.shape[:2], min_size, max_size)
  padded = (inference._round_up(h, 32), inference._round_up(w, 32))
  canvas = padded if exact else (inference._round_up(h, BUCKET), inference._round_up(w, BUCKET))
  args = (jnp.zeros((1,) + canvas + (3,), jnp.float32), jnp.asarray([[h, w]], jnp.int32),
          jnp.asarray([padded], jnp.int32))
  fresh = jax.jit(lambda v, x, i, p: model.apply(v, x, i, p))
  start = time.perf_counter()
  lowered = fresh.lower(variables, *args)
  traced = time.perf_counter()
  lowered.compile()
  return dict(trace_lower_s=traced - start, compile_s=time.perf_counter() - traced, canvas=canvas)


def ours_stages(model, variables, image, min_size, max_size, runs):
  """Our steady-state time per stage (bucketed canvas), seconds, and the stage inputs' shapes."""
  import jax
  import jax.numpy as jnp

  from maskrcnn_jax.data.preprocess import normalize, resize_bilinear, resized_size
  from maskrcnn_jax.evaluation import inference
  from maskrcnn_jax.modeling.rpn import PYRAMID_LEVELS, RPNHead
  from maskrcnn_jax.ops import anchors as anchor_ops
  from maskrcnn_jax.ops.masks import select_class_channel

  h0, w0 = image.shape[:2]
  h, w = resized_size(h0, w0, min_size, max_size)
  padded = (inference._round_up(h, 32), inference._round_up(w, 32))
  canvas = (inference._round_up(h, BUCKET), inference._round_up(w, BUCKET))

  def preprocess():
    pixels = resize_bilinear(normalize(image), h, w)
    batch = np.zeros((1,) + canvas + (3,), np.float32)
    batch[0, :h, :w] = pixels
    return pixels, batch

  pixels, batch = preprocess()
  x = jnp.asarray(batch)
  isz = jnp.asarray([[h, w]], jnp.int32)
  psz = jnp.asarray([padded], jnp.int32)

  def _features(m, x, ps):
    return m.features(x, ps)

  def _rpn(m, pyr, isz, ps):
    r = m.rpn(pyr, isz, ps, train=False)
    return r["proposals"], r["proposal_valid"]

  def _rpn_select(m, logits, deltas, isz, ps, grid_shapes):
    # RPN.__call__ after its head: anchors, per-level top-k, decode, clip, NMS, top-k.
    rpn = m.rpn
    cells = rpn.cells()
    levels = PYRAMID_LEVELS[:len(grid_shapes)]
    anchors, anchor_valid = jax.vmap(
        lambda s: anchor_ops.multilevel_anchors(grid_shapes, levels, (s[0], s[1]), cells))(ps)
    sizes = [l.shape[1] for l in logits]
    k_pre, k_post = rpn.pre_nms_topk_test, rpn.post_nms_topk_test
    select = lambda lg, dl, an, av, sz: rpn._select(lg, dl, an, av, sz, sizes, k_pre, k_post)
    return jax.vmap(select)(
        jnp.concatenate(logits, 1), jnp.concatenate(deltas, 1), anchors, anchor_valid, isz)

  def _box_pool(m, pyr, props):
    return m.box_pooler(dict(zip(PYRAMID_LEVELS, pyr)), props)

  def _box_head(m, pooled):
    return m.box_head(pooled)

  def _postprocess(m, logits, deltas, props, valid, isz):
    return jax.vmap(lambda *a: m.postprocess(*a, m.box_head.bbox_reg_weights))(
        logits, deltas, props, valid, isz)

  def _mask_pool(m, pyr, boxes):
    return m.head("mask_head").pooler(dict(zip(PYRAMID_LEVELS, pyr)), boxes)

  def _mask_head(m, pooled, labels):
    b, d = pooled.shape[:2]
    logits = m.mask_head(pooled.reshape((b * d,) + pooled.shape[2:]))
    logits = logits.reshape((b, d) + logits.shape[1:])
    return jax.nn.sigmoid(select_class_channel(logits, labels))

  def jitted(f, static=()):
    g = jax.jit(lambda v, *a: model.apply(v, *a, method=f),
                static_argnums=tuple(i + 1 for i in static))
    return lambda *a: jax.block_until_ready(g(variables, *a))

  rpn_cfg = model.rpn
  head = RPNHead(len(rpn_cfg.aspect_ratios) * len(rpn_cfg.anchor_sizes[0]), rpn_cfg.channels,
                 rpn_cfg.conv_depth, rpn_cfg.dtype)
  head_params = {"params": variables["params"]["rpn"]["head"]}
  head_fn = jax.jit(lambda p, pyr, ps: head.apply(p, pyr, ps))

  f_features, f_rpn = jitted(_features), jitted(_rpn)
  f_rpn_select = jitted(_rpn_select, static=(4,))
  f_box_pool, f_box_head, f_post = jitted(_box_pool), jitted(_box_head), jitted(_postprocess)
  f_mask_pool, f_mask_head = jitted(_mask_pool), jitted(_mask_head)
  f_forward = lambda: jax.block_until_ready(inference._forward(model, variables, x, isz, psz))

  compile_start = time.perf_counter()
  pyr = f_features(x, psz)
  props, pvalid = f_rpn(pyr, isz, psz)
  rpn_logits, rpn_deltas = jax.block_until_ready(head_fn(head_params, pyr, psz))
  grid_shapes = tuple(tuple(p.shape[1:3]) for p in pyr)
  f_rpn_select(rpn_logits, rpn_deltas, isz, psz, grid_shapes)
  pooled = f_box_pool(pyr, props)
  logits, deltas = f_box_head(pooled)
  dets = f_post(logits, deltas, props, pvalid, isz)
  mpooled = f_mask_pool(pyr, dets["boxes"])
  f_mask_head(mpooled, dets["labels"])
  out = jax.device_get(f_forward())
  stage_compile = time.perf_counter() - compile_start

  p = dict(orig=(h0, w0), size=(h, w), padded=padded, canvas=canvas, pixels=pixels)
  det0 = {k: v[0] for k, v in out.items()}
  small = det0["masks"][det0["valid"]]
  n_det = int(small.shape[0])
  paste_boxes = inference._to_original_frame(
      {k: v for k, v in det0.items() if k != "masks"}, p, BUCKET, None)["boxes"]
  ch, cw = inference._round_up(h0, BUCKET), inference._round_up(w0, BUCKET)

  def paste_only():
    c = inference._PASTE_CHUNK
    for s in range(0, n_det, c):
      m = np.zeros((c,) + small.shape[1:], np.float32)
      b = np.zeros((c, 4), np.float32)
      k = min(c, n_det - s)
      m[:k], b[:k] = small[s:s + k], paste_boxes[s:s + k]
      np.asarray(inference._paste(m, b, ch, cw))

  fns = {
      "preprocess": preprocess,
      "features": lambda: f_features(x, psz),
      "rpn_head": lambda: jax.block_until_ready(head_fn(head_params, pyr, psz)),
      "rpn_select": lambda: f_rpn_select(rpn_logits, rpn_deltas, isz, psz, grid_shapes),
      "rpn": lambda: f_rpn(pyr, isz, psz),
      "box_pool": lambda: f_box_pool(pyr, props),
      "box_head": lambda: f_box_head(pooled),
      "box_post": lambda: f_post(logits, deltas, props, pvalid, isz),
      "mask_pool": lambda: f_mask_pool(pyr, dets["boxes"]),
      "mask_head": lambda: f_mask_head(mpooled, dets["labels"]),
      "forward": f_forward,
      "paste": paste_only,
      "host_post": lambda: inference._to_original_frame(det0, p, BUCKET, None),
  }
  timings = _common.interleaved_times(fns, runs)
  times = {k: min(v.wall) for k, v in timings.items()}
  others = _common.median_or_none([o for v in timings.values() for o in v.others])
  return times, dict(others=others, canvas=canvas, n_det=n_det, slots=int(det0["valid"].shape[0]),
                     stage_compile_s=stage_compile)


def tv_stages(tv, image, runs):
  """torchvision's steady-state time per stage, seconds."""
  import torch
  from torchvision.models.detection.roi_heads import maskrcnn_inference
  from torchvision.models.detection.rpn import concat_box_prediction_layers

  rh = tv.roi_heads
  x = to_tensor(image)
  orig = [tuple(image.shape[:2])]
  with torch.inference_mode():
    il, _ = tv.transform([x])
    feats = tv.backbone(il.tensors)
    props, _ = tv.rpn(il, feats)
    flist = list(feats.values())
    objectness, rpn_deltas = tv.rpn.head(flist)
    pooled = rh.box_roi_pool(feats, props, il.image_sizes)
    cls, reg = rh.box_predictor(rh.box_head(pooled))
    boxes, scores, labels = rh.postprocess_detections(cls, reg, props, il.image_sizes)
    mpooled = rh.mask_roi_pool(feats, boxes, il.image_sizes)
    dets = [dict(boxes=boxes[0], scores=scores[0], labels=labels[0])]
    dets[0]["masks"] = maskrcnn_inference(rh.mask_predictor(rh.mask_head(mpooled)), labels)[0]
  n_det = int(boxes[0].shape[0])

  def mask_head():
    probs = maskrcnn_inference(rh.mask_predictor(rh.mask_head(mpooled)), labels)
    return probs

  def rpn_select():
    # RegionProposalNetwork.forward after its head (eval mode).
    anchors = tv.rpn.anchor_generator(il, flist)
    per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    obj, deltas = concat_box_prediction_layers(objectness, rpn_deltas)
    proposals = tv.rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    return tv.rpn.filter_proposals(proposals, obj, il.image_sizes, per_level)

  def numpy_out():
    d = dets[0]
    return [d[k].numpy() for k in ("boxes", "scores", "labels")]

  def wrap(f):
    def g():
      with torch.inference_mode():
        return f()
    return g

  fns = {
      "preprocess": wrap(lambda: tv.transform([to_tensor(image)])),
      "features": wrap(lambda: tv.backbone(il.tensors)),
      "rpn_head": wrap(lambda: tv.rpn.head(flist)),
      "rpn_select": wrap(rpn_select),
      "rpn": wrap(lambda: tv.rpn(il, feats)),
      "box_pool": wrap(lambda: rh.box_roi_pool(feats, props, il.image_sizes)),
      "box_head": wrap(lambda: rh.box_predictor(rh.box_head(pooled))),
      "box_post": wrap(lambda: rh.postprocess_detections(cls, reg, props, il.image_sizes)),
      "mask_pool": wrap(lambda: rh.mask_roi_pool(feats, boxes, il.image_sizes)),
      "mask_head": wrap(mask_head),
      "host_post": wrap(lambda: tv.transform.postprocess(
          [{k: v for k, v in dets[0].items()}], il.image_sizes, orig)),
      "numpy": wrap(numpy_out),
  }
  timings = _common.interleaved_times(fns, runs)
  times = {k: min(v.wall) for k, v in timings.items()}
  others = _common.median_or_none([o for v in timings.values() for o in v.others])
  return times, dict(others=others, padded=tuple(il.tensors.shape[-2:]), n_det=n_det)


STAGE_ROWS = [
    ("preprocess", "host preprocessing (normalize, resize, pad) / transform"),
    ("features", "backbone + FPN"),
    ("rpn_head", "RPN head (3x3 conv + 1x1s)"),
    ("rpn_select", "RPN proposals (anchors, top-k, decode, NMS)"),
    ("box_pool", "box RoIAlign 7x7 x 1000"),
    ("box_head", "box head (fc6, fc7, predictor)"),
    ("box_post", "box postprocess (decode, per-class NMS)"),
    ("mask_pool", "mask RoIAlign 14x14 x detections"),
    ("mask_head", "mask head (4 convs, deconv, logits, pick)"),
    ("host_post", "mask paste + to original frame / postprocess"),
]


# ----------------------------------------------------------------------------------------------
# Main


def run_size(size, args, in_dir, tv, model, variables):
  import maskrcnn_jax
  import maskrcnn_jax.evaluation.inference as inference
  from tests.reference.tv_models import match_detections

  photo, min_size, max_size = case_for(size)
  image = load_photo(in_dir, photo)
  set_tv_sizes(tv, min_size, max_size)
  res = dict(size=size, photo=photo, image_shape=image.shape[:2], min_size=min_size,
             max_size=max_size)

  # 2. First calls (compilation), each mode on its own.
  first, traces = {}, {}
  for name, exact in (("bucketed", False), ("exact", True)):
    before = dict(inference.TRACE_COUNTS)
    first[name] = _common.timed(lambda: ours_predict(model, variables, image, min_size, max_size,
                                                     exact))
    traces[name] = {k: v - before.get(k, 0) for k, v in inference.TRACE_COUNTS.items()
                    if v - before.get(k, 0)}
  first["torchvision"] = _common.timed(lambda: tv_predict(tv, image))

  # 1. Full inference, interleaved; the last outputs are kept for the agreement check.
  last = {}

  def keep(name, fn):
    def call():
      last[name] = fn()
    return call

  fns = {
      "bucketed": keep("bucketed", lambda: ours_predict(model, variables, image, min_size,
                                                        max_size, False)),
      "exact": keep("exact", lambda: ours_predict(model, variables, image, min_size, max_size,
                                                  True)),
      "torchvision": keep("torchvision", lambda: tv_predict(tv, image)),
  }
  before = dict(inference.TRACE_COUNTS)
  times = _common.interleaved_times(fns, args.runs, warmup=0)
  retraces = sum(v - before.get(k, 0) for k, v in inference.TRACE_COUNTS.items())
  res["full"] = {k: _common.median(v.wall) for k, v in times.items()}
  res["best"] = {k: min(v.wall) for k, v in times.items()}
  res["others"] = {k: _common.median_or_none(v.others) for k, v in times.items()}
  res["cpu"] = {k: _common.median(v.cpu) for k, v in times.items()}
  res["runs_wall"] = {k: v.wall for k, v in times.items()}
  res["first"] = first
  # A first call that traced nothing (exact mode on a canvas the bucketed call already compiled)
  # compiled nothing.
  res["compile"] = {k: (first[k] - res["full"][k]) if traces[k] else None
                    for k in ("bucketed", "exact")}
  res["traces"] = traces
  res["steady_retraces"] = retraces
  res["aot"] = {k: compile_split(model, variables, image, min_size, max_size, k == "exact")
                for k in ("bucketed", "exact")}

  # Throughput over several images (batch 1): ours dispatches image i + 1 before reading image i.
  if args.throughput:
    many = [np.ascontiguousarray(image[:, ::-1]) if i % 2 else image
            for i in range(args.throughput)]
    ours_many = lambda: maskrcnn_jax.predict(model, variables, many, min_size=min_size,  # noqa
                                             max_size=max_size, bucket=BUCKET)
    tv_many = lambda: [tv_predict(tv, im) for im in many]  # noqa: E731
    ours_many()  # the mirrored photo's detection count may need another head bucket
    tput = _common.interleaved_times({"ours": ours_many, "torchvision": tv_many}, 1, warmup=0)
    res["throughput"] = {k: len(many) / v.wall[0] for k, v in tput.items()}
    res["throughput_images"] = len(many)

  # Agreement (a sanity check that both sides compute the same thing).
  res["agree"] = {}
  for name in ("bucketed", "exact"):
    st = match_detections(last["torchvision"], last[name])
    res["agree"][name] = dict(n_ref=st["n_ref"], n_ours=st["n_ours"], rate=st["rate"],
                              mask_ok=st["mask_ok_rate"])

  # 4. Per-stage breakdowns.
  if not args.skip_stages:
    res["ours_stages"], res["ours_info"] = ours_stages(model, variables, image, min_size,
                                                       max_size, args.stage_runs)
    res["tv_stages"], res["tv_info"] = tv_stages(tv, image, args.stage_runs)
    res["stage_runs"] = args.stage_runs
  return res


def print_size(res, memory):
  full = res["full"]
  h0, w0 = res["image_shape"]
  print(f"\n== {res['photo']} {h0}x{w0}, min_size {res['min_size']}, max_size {res['max_size']} ==")
  cpu = res["cpu"]
  best, others = res["best"], res["others"]
  print(f"{'full inference':16s} {'wall s':>7s} {'ours/tv':>7s} {'best s':>7s} {'ours/tv':>7s}"
        f" {'CPU s':>6s} {'ours/tv':>7s} {'others':>6s} {'first s':>7s} {'compile':>7s}  traces")
  for k in ("bucketed", "exact", "torchvision"):
    comp = res["compile"].get(k)
    comp_s = f"{comp:7.1f}" if comp is not None else f"{'-':>7s}"
    oth = "n/a" if others[k] is None else f"{others[k]:.2f}"
    tr = ", ".join(f"{n} {c}" for n, c in res["traces"].get(k, {}).items()) or "-"
    print(f"{('ours ' + k) if k != 'torchvision' else k:16s} {full[k]:7.3f}"
          f" {full[k] / full['torchvision']:7.2f} {best[k]:7.3f}"
          f" {best[k] / best['torchvision']:7.2f}"
          f" {cpu[k]:6.2f} {cpu[k] / cpu['torchvision']:7.2f} {oth:>6s} {res['first'][k]:7.1f}"
          f" {comp_s}  {tr}")
  print(f"  (wall: median, best: fastest of the {len(res['runs_wall']['torchvision'])} runs; CPU: "
        f"this process's CPU seconds, median; others: cores busy with other processes meanwhile, "
        f"median; compile: first call - median; retraces in the timed runs: "
        f"{res['steady_retraces']})")
  for k, a in res["aot"].items():
    print(f"  ahead-of-time, {k} canvas {a['canvas'][0]}x{a['canvas'][1]}: trace + lower "
          f"{a['trace_lower_s']:.1f} s, XLA compile {a['compile_s']:.1f} s")
  if "throughput" in res:
    t = res["throughput"]
    print(f"  throughput over {res['throughput_images']} images, batch 1: ours "
          f"{t['ours']:.3f} images/s, torchvision {t['torchvision']:.3f} images/s "
          f"(ours/tv time {t['torchvision'] / t['ours']:.2f}x)")
  for k, a in res["agree"].items():
    print(f"  agreement, {k}: {a['n_ours']} detections vs torchvision's {a['n_ref']}, "
          f"{a['rate']:.0%} matched, {a['mask_ok']:.0%} of matched masks IoU >= 0.98")
  if memory:
    print(f"{'memory (own process)':28s} {'base MB':>9s} {'peak MB':>8s} {'+infer MB':>10s}"
          f" {'+steady MB':>11s}")
    for side in ("ours", "torch"):
      m = memory[side]
      st = "n/a" if m["steady_delta_mb"] is None else f"{m['steady_delta_mb']:.0f}"
      name = "ours (bucketed)" if side == "ours" else "torchvision"
      print(f"{name:28s} {m['base_mb']:9.0f} {m['peak_mb']:8.0f} {m['delta_mb']:10.0f} {st:>11s}")
    print("  (base: RSS just before the first inference call; peak: ru_maxrss of the process;"
          " +infer: peak - base, warm-up incl. compilation and the timed runs; +steady: peak growth"
          " during steady-state calls only)")
  if "ours_stages" in res:
    o, t = res["ours_stages"], res["tv_stages"]
    oi, ti = res["ours_info"], res["tv_info"]
    oth = lambda v: "n/a" if v is None else f"{v:.2f}"
    print(f"per stage, steady state, fastest of {res['stage_runs']} (ours on the "
          f"{oi['canvas'][0]}x{oi['canvas'][1]} bucketed canvas, {oi['n_det']} of {oi['slots']}"
          " mask"
          f" slots used; torchvision on {ti['padded'][0]}x{ti['padded'][1]}, {ti['n_det']} "
          f"detections; others' cores busy: {oth(oi['others'])} / {oth(ti['others'])})")
    print(f"{'stage':48s} {'ours s':>8s} {'tv s':>8s} {'ours/tv':>8s}")
    so = st_ = 0.0
    for key, label in STAGE_ROWS:
      so += o[key]
      st_ += t[key]
      print(f"{label:48s} {o[key]:8.3f} {t[key]:8.3f} {o[key] / max(t[key], 1e-9):8.2f}")
    print(f"{'sum of stages':48s} {so:8.3f} {st_:8.3f} {so / st_:8.2f}")
    print(f"  ours: whole jitted forward {o['forward']:.3f} s = backbone + FPN {o['features']:.3f}"
          f" + rest {o['forward'] - o['features']:.3f}; mask paste kernels alone"
          f" {o['paste']:.3f} s;"
          f" stage jits compiled in {oi['stage_compile_s']:.0f} s")
    print(f"  RPN as one call: ours {o['rpn']:.3f} s, torchvision {t['rpn']:.3f} s; torchvision "
          f"tensors to numpy {t['numpy'] * 1e3:.1f} ms")


def markdown(results, memories, args, header):
  lines = ["### End-to-end inference vs torchvision (`benchmarks/bench_inference.py`)", "",
           header, "",
           "| input | ours bucketed s | ours exact s | torchvision s | bucketed/tv | exact/tv "
           "| best-of bucketed/tv | CPU s bucketed/tv | others' cores "
           "| compile s (bucketed, exact) "
           "| peak RSS MB ours / tv | +infer MB ours / tv | +steady MB ours / tv |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for res in results:
    f = res["full"]
    m = memories.get(res["size"])
    fmt = lambda v: "n/a" if v is None else f"{v:.0f}"
    mem = (f"{m['ours']['peak_mb']:.0f} / {m['torch']['peak_mb']:.0f} | "
           f"{m['ours']['delta_mb']:.0f} / {m['torch']['delta_mb']:.0f} | "
           f"{fmt(m['ours']['steady_delta_mb'])} / {fmt(m['torch']['steady_delta_mb'])}"
           ) if m else "- | - | -"
    b = res["best"]
    oth = res["others"]["torchvision"]
    h0, w0 = res["image_shape"]
    c = res["cpu"]
    comp = ", ".join("-" if res["compile"][k] is None else f"{res['compile'][k]:.0f}"
                     for k in ("bucketed", "exact"))
    lines.append(
        f"| {res['photo']} {h0}x{w0} -> min {res['min_size']} max {res['max_size']} "
        f"| {f['bucketed']:.2f} | {f['exact']:.2f} | {f['torchvision']:.2f} "
        f"| {f['bucketed'] / f['torchvision']:.2f}x | {f['exact'] / f['torchvision']:.2f}x "
        f"| {b['bucketed'] / b['torchvision']:.2f}x "
        f"| {c['bucketed']:.2f} / {c['torchvision']:.2f} = {c['bucketed'] / c['torchvision']:.2f}x "
        f"| {'n/a' if oth is None else f'{oth:.1f}'} | {comp} | {mem} |")
  for res in results:
    if "throughput" in res:
      t = res["throughput"]
      lines += ["", f"Throughput, {res['photo']} at {res['size']}, {res['throughput_images']} "
                f"images at batch 1: ours {t['ours']:.3f} images/s, torchvision "
                f"{t['torchvision']:.3f} images/s (ours/tv time "
                f"{t['torchvision'] / t['ours']:.2f}x)."]
  staged = [r for r in results if "ours_stages" in r]
  if staged:
    lines += ["",
              "Per stage, steady state, fastest of a few runs, seconds (ours / torchvision):", "",
              "| stage | " + " | ".join(f"{r['size']}" for r in staged) + " |",
              "| --- |" + " --- |" * len(staged)]
    for key, label in STAGE_ROWS:
      cells = [f"{r['ours_stages'][key]:.3f} / {r['tv_stages'][key]:.3f}" for r in staged]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  global TORCH_THREADS
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=5, help="timed runs of the full inference")
  parser.add_argument("--sizes", type=int, nargs="+", default=[800, 512])
  parser.add_argument("--stage-runs", type=int, default=3,
                      help="timed runs per stage of the per-stage breakdown")
  parser.add_argument("--skip-memory", action="store_true")
  parser.add_argument("--memory-runs", type=int, default=2,
                      help="runs after the warm-up in each memory child")
  parser.add_argument("--memory-sizes", type=int, nargs="*", default=None,
                      help="sizes to measure memory at (default: the first of --sizes)")
  parser.add_argument("--skip-stages", action="store_true", help="no per-stage breakdown")
  parser.add_argument("--torch-threads", type=int, default=TORCH_THREADS,
                      help="torch.set_num_threads for torchvision")
  parser.add_argument("--init", choices=["detector", "plain"], default="detector",
                      help="detector-like random weights (100 detections on both sides) or "
                      "torchvision's plain random init (few detections)")
  parser.add_argument("--throughput", type=int, default=8,
                      help="images per throughput run (images/s, batch 1; 0: skip)")
  parser.add_argument("--child", choices=["ours", "torch", "inputs"], help=argparse.SUPPRESS)
  parser.add_argument("--in-dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  TORCH_THREADS = args.torch_threads

  if args.child == "inputs":
    write_inputs(args.in_dir, args.init)
    return
  if args.child:
    print(json.dumps(memory_child(args.child, args.sizes[0], args.runs, args.in_dir)))
    return

  start = time.perf_counter()
  tmp = tempfile.TemporaryDirectory(prefix="bench_inference_")
  in_dir = tmp.name
  # Everything that spawns a measuring child happens while this process is still small.
  _common.run_json_child([os.path.abspath(__file__), "--child", "inputs", "--in-dir", in_dir,
                          "--init", args.init])
  print(f"weights and photos written ({time.perf_counter() - start:.0f} s)", flush=True)
  memories = {}
  if not args.skip_memory:
    msizes = args.memory_sizes if args.memory_sizes is not None else args.sizes[:1]
    for size in msizes:
      memories[size] = {}
      for side in ("ours", "torch"):
        memories[size][side] = memory_in_subprocess(side, size, args.memory_runs, in_dir)
        print(f"memory {side} at {size}: {memories[size][side]} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

  import jax
  import torch  # torch and torchvision before anything that might import TensorFlow.
  import torchvision

  tv = load_torchvision(in_dir)
  model, variables = load_ours(in_dir)
  load_start = _common.load_average()
  results = []
  for size in args.sizes:
    results.append(run_size(size, args, in_dir, tv, model, variables))
    print(f"size {size} done ({time.perf_counter() - start:.0f} s)", flush=True)

  header = (f"CPU `{platform.processor() or platform.machine()}`, {os.cpu_count()} cores; "
            f"jax {jax.__version__} (default CPU client), torch {torch.__version__} "
            f"({TORCH_THREADS} threads), torchvision {torchvision.__version__}; median of "
            f"{args.runs} runs after a warm-up, interleaved; {load_start} at start, "
            f"{_common.load_average()} at end; R50-FPN, "
            f"{'detector-like' if args.init == 'detector' else 'torchvision plain'} random "
            f"weights, batch 1.")
  print("\n" + header)
  for res in results:
    print_size(res, memories.get(res["size"]))
  print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s\n")
  print(markdown(results, memories, args, header))
  tmp.cleanup()


if __name__ == "__main__":
  main()
