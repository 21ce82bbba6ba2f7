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
import _programs  # noqa: E402  (the production programs, built from a config)

_common.add_repo_to_path()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

KINDS = {"stablehlo.gather": "gather", "stablehlo.dynamic_gather": "gather",
         "stablehlo.scatter": "scatter", "stablehlo.sort": "sort", "stablehlo.while": "while",
         "stablehlo.convolution": "conv", "stablehlo.dot_general": "dot"}
COLUMNS = ("gather", "scatter", "sort", "while", "conv", "dot")
_ORIGIN = re.compile(r'maskrcnn_jax/([\w/]+\.py)"?:(\d+)')


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
  config = _programs.load_config(args.config, args.canvas)
  print(f"config {os.path.relpath(args.config, _common.REPO_ROOT)}, canvas "
        f"{tuple(config.data.image_size)}, {args.batch} image(s) per device")
  makers = dict(train=_programs.train_step, predict=_programs.forward)
  header = ("| program | platform | " + " | ".join(COLUMNS)
            + " | GFLOP/image | GB accessed/image | lower s |")
  rows, origins = [header, "|" + "---|" * (len(COLUMNS) + 5)], []
  for what in args.what.split(","):
    fn, fargs = makers[what](config, args.batch, abstract=True)
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
