"""What the production programs hold, per platform: lowered from this machine, no device needed.

    python benchmarks/hlo_report.py [--config configs/r50_fpn_coco.py] [--platforms cpu,cuda,tpu]
        [--batch 2] [--canvas 1024] [--what train,predict] [--by_origin]

Lowers (without compiling) the training step `train.py` runs (`parallel.make_parallel_step` of
`parallel.make_train_step`, gradients and optimizer update included, on a one-device mesh, `--batch`
images per device) and the forward pass `maskrcnn_jax.predict` runs (`--batch` images), each for
every platform in `--platforms` (`lowering_platforms`, so `lax.platform_dependent` picks that
platform's forms), and prints per platform and program:

  * the counts of gather, scatter, sort, while, convolution and dot_general ops in the StableHLO,
    walking the call graph from `main` (a function called from several places counts per call);
  * with --by_origin, the same counts split by the maskrcnn_jax source file each op comes from
    (its innermost frame in our code, read from the op's location), so that e.g. a scatter in
    ops/roi_align.py is told apart from one in jax's own code;
  * GFLOPs and GB accessed per image from XLA's HLO cost analysis of the lowered module
    (`Lowered.cost_analysis()`: counted on the unoptimized program, the same way on every
    platform).

Shapes come from the config: `data.image_size` (or --canvas), `data.max_instances`,
`data.max_crowd_instances`, `data.mask_crop_size`, the heads' batch keys.
"""
import argparse
import collections
import os
import re
import sys
import time
from typing import Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.add_repo_to_path()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

KINDS = {"stablehlo.gather": "gather", "stablehlo.dynamic_gather": "gather",
         "stablehlo.scatter": "scatter", "stablehlo.sort": "sort", "stablehlo.while": "while",
         "stablehlo.convolution": "conv", "stablehlo.dot_general": "dot"}
COLUMNS = ("gather", "scatter", "sort", "while", "conv", "dot")
_ORIGIN = re.compile(r'maskrcnn_jax/([\w/]+\.py)"?:(\d+)')


def load_config(path: str, canvas: int = 0):
  import importlib.util
  spec = importlib.util.spec_from_file_location("hlo_report_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if canvas:
    config.data.image_size = (canvas, canvas)
  return config


def abstract_batch(config, model, batch: int) -> Dict:
  """ShapeDtypeStructs of one device's training batch, as the data pipeline makes it."""
  import jax
  import numpy as np
  d = config.data
  h, w = tuple(d.image_size)
  m, mc = int(d.get("max_instances", 100)), int(d.get("max_crowd_instances", 20))
  s = int(d.get("mask_crop_size", 112))
  k = int(config.model.get("keypoint_head", {}).get("num_keypoints", 17))
  shapes = dict(image=((batch, h, w, 3), np.float32), image_size=((batch, 2), np.int32),
                gt_boxes=((batch, m, 4), np.float32), gt_classes=((batch, m), np.int32),
                gt_valid=((batch, m), bool), crowd_boxes=((batch, mc, 4), np.float32),
                crowd_valid=((batch, mc), bool),
                gt_masks=((batch, m, s, s), np.dtype(d.get("mask_dtype", "float32"))),
                gt_keypoints=((batch, m, k, 3), np.float32))
  missing = [key for key in model.batch_keys if key not in shapes]
  if missing:
    raise SystemExit(f"hlo_report: no shape known for batch keys {missing}")
  return {key: jax.ShapeDtypeStruct(*shapes[key]) for key in model.batch_keys}


def lower_train_step(config, batch: int):
  """(jitted production step, abstract args) on a one-device mesh."""
  import jax

  from maskrcnn_jax.training import optimizer, parallel, trainer
  model = trainer.model_from_config(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  training = config.training
  tx_fn = lambda params: optimizer.make_optimizer(training, params)
  state = trainer.abstract_train_state(model, tx_fn, mesh)
  step = parallel.make_parallel_step(
      parallel.make_train_step(model, tx_fn(state.params),
                               optimizer.learning_rate_schedule(training),
                               optimizer.trainable_mask(state.params,
                                                        int(training.get("frozen_stages", 0)))),
      mesh)
  return step, (state, abstract_batch(config, model, batch))


def lower_predict(config, batch: int):
  """(jitted forward of `predict`, abstract args): normalized images on the config's canvas."""
  import jax
  import numpy as np

  from maskrcnn_jax.evaluation import inference
  from maskrcnn_jax.modeling.builder import build_model
  from maskrcnn_jax.training import initialization
  model = build_model(config.model)
  variables = jax.eval_shape(lambda: initialization.random_variables(model, 0))
  h, w = tuple(config.data.image_size)
  sizes = jax.ShapeDtypeStruct((batch, 2), np.int32)
  fn = jax.jit(lambda v, im, s, p: inference._forward.__wrapped__(model, v, im, s, p))
  return fn, (variables, jax.ShapeDtypeStruct((batch, h, w, 3), np.float32), sizes, sizes)


def census(lowered) -> Tuple[collections.Counter, Dict[str, collections.Counter]]:
  """(counts per kind, {origin file: counts per kind}) of the lowered module's ops, walking the
  call graph from `main` (a private function counts once per call site; its ops without a frame
  of ours take the call site's origin)."""
  module = lowered.compiler_ir("stablehlo")
  funcs = {}
  for op in module.body.operations:
    if op.operation.name == "func.func":
      funcs[str(op.attributes["sym_name"]).strip('"')] = op
  total, by_origin = collections.Counter(), collections.defaultdict(collections.Counter)

  def origin_of(op, inherited):
    found = _ORIGIN.findall(str(op.location))
    return found[0][0] if found else inherited

  def visit(op, inherited, depth):
    name = op.operation.name
    origin = origin_of(op, inherited)
    kind = KINDS.get(name)
    if kind:
      total[kind] += 1
      by_origin[origin][kind] += 1
    if name == "func.call" and depth < 64:
      callee = funcs.get(str(op.attributes["callee"]).lstrip("@"))
      if callee is not None:
        visit(callee, origin, depth + 1)
    for region in op.operation.regions:
      for block in region.blocks:
        for inner in block.operations:
          visit(inner, origin, depth)

  visit(funcs["main"], "(jax / no frame of ours)", 0)
  return total, dict(by_origin)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(_common.REPO_ROOT, "configs", "r50_fpn_coco.py"))
  p.add_argument("--platforms", default="cpu,cuda,tpu")
  p.add_argument("--what", default="train,predict")
  p.add_argument("--batch", type=int, default=2, help="images per device")
  p.add_argument("--canvas", type=int, default=0, help="square canvas (default: the config's)")
  p.add_argument("--by_origin", action="store_true")
  args = p.parse_args()
  config = load_config(args.config, args.canvas)
  print(f"config {os.path.relpath(args.config, _common.REPO_ROOT)}, canvas "
        f"{tuple(config.data.image_size)}, {args.batch} image(s) per device")
  makers = dict(train=lower_train_step, predict=lower_predict)
  header = ("| program | platform | " + " | ".join(COLUMNS)
            + " | GFLOP/image | GB accessed/image | lower s |")
  rows, origins = [header, "|" + "---|" * (len(COLUMNS) + 5)], []
  for what in args.what.split(","):
    fn, fargs = makers[what](config, args.batch)
    traced = fn.trace(*fargs)
    for platform in args.platforms.split(","):
      start = time.time()
      lowered = traced.lower(lowering_platforms=(platform,))
      seconds = time.time() - start
      total, by_origin = census(lowered)
      try:
        cost = lowered.cost_analysis() or {}
      except Exception:  # noqa: BLE001 (not every jax build analyses every platform)
        cost = {}
      flops = cost.get("flops")
      nbytes = cost.get("bytes accessed")
      fmt = lambda v, scale: "-" if v is None else f"{v / scale / args.batch:.1f}"
      rows.append(f"| {what} | {platform} | " + " | ".join(str(total[c]) for c in COLUMNS)
                  + f" | {fmt(flops, 1e9)} | {fmt(nbytes, 1e9)} | {seconds:.1f} |")
      for origin, counts in sorted(by_origin.items()):
        origins.append(f"| {what} | {platform} | {origin} | "
                       + " | ".join(str(counts[c]) for c in COLUMNS) + " |")
  print("\n".join(rows))
  if args.by_origin:
    print("\n| program | platform | origin | " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    print("\n".join(origins))


if __name__ == "__main__":
  main()
