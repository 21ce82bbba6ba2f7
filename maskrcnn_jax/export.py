"""Serving export: the jitted forward as `jax.export` artifacts, run by `maskrcnn_jax.serving`.

    python -m maskrcnn_jax.export --config configs/r50_fpn_coco.py --workdir /tmp/run --out DIR
    python -m maskrcnn_jax.export --config configs/torchvision_r50_fpn.py \\
        --torchvision_weights w.pth --out DIR --platforms cpu,cuda,tpu --canvases 800x1344,1344x800

DIR then holds:
- `canvas_<H>x<W>.jax`: one serialized `jax.export.Exported` per canvas (the padded batch's pixel
  size), each lowered for every platform of `--platforms` (no device of those kinds is needed to
  write them) with a symbolic batch size `b`;
- `weights.npz`: the parameters and batch-norm statistics, stored once and passed to every artifact
  as its first input (a list in `serving.json`'s order), not baked into each as constants;
- `serving.json`: the contract: inputs, outputs, platforms, canvases and the host pre- and
  post-processing that `maskrcnn_jax.predict` applies around the same forward (torchvision's eval
  transform; boxes scaled back to the original frame; masks pasted as torchvision pastes them).

`maskrcnn_jax.serving.load(DIR)` runs them with jax and numpy alone (no flax, no model code).
"""
import json
import math
import os
import sys
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax import paths

FORMAT = "maskrcnn_jax.serving"
VERSION = 1
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
CONTRACT_FILE = "serving.json"
WEIGHTS_FILE = "weights.npz"


def artifact_name(canvas: Tuple[int, int]) -> str:
  return f"canvas_{canvas[0]}x{canvas[1]}.jax"


def default_canvases(min_size: int, max_size: int, bucket: int = 128) -> Tuple[Tuple[int, int]]:
  """The landscape and portrait canvases that hold every image resized to `min_size` /
  `max_size` (sides rounded up to `bucket`, as `predict` rounds them)."""
  short = int(math.ceil(min_size / bucket) * bucket)
  long = int(math.ceil(max_size / bucket) * bucket)
  return tuple(sorted({(short, long), (long, short)}))


def parse_canvases(text: str) -> Tuple[Tuple[int, int]]:
  """'800x1344,1344x800' -> ((800, 1344), (1344, 800)); sides must be positive multiples of 32."""
  canvases = []
  for item in filter(None, (t.strip() for t in text.split(","))):
    try:
      h, w = (int(v) for v in item.lower().split("x"))
    except ValueError:
      raise ValueError(f"canvas {item!r} is not HxW (e.g. 800x1344)") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
      raise ValueError(f"canvas {item!r}: sides must be positive multiples of 32")
    canvases.append((h, w))
  if not canvases:
    raise ValueError("no canvas given")
  return tuple(dict.fromkeys(canvases))


def parse_platforms(text: str) -> Tuple[str]:
  platforms = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
  bad = [p for p in platforms if p not in PLATFORMS]
  if not platforms or bad:
    raise ValueError(f"platforms must be a comma-separated subset of {PLATFORMS}, got {text!r}")
  return platforms


def export_model(model, variables: Dict[str, Any], out_dir: str, *,
                 canvases: Sequence[Tuple[int, int]], platforms: Sequence[str] = ("cpu",),
                 min_size: int = 800, max_size: int = 1333, description: str = "") -> str:
  """Writes the artifacts, weights and contract of `model` with `variables` into `out_dir`.

  Args:
    model: a `MaskRCNN`.
    variables: its {'params', 'batch_stats'} (host or device arrays).
    out_dir: a local folder or a URL (created).
    canvases: (H, W) canvas sizes, multiples of 32; one artifact each.
    platforms: lowering platforms of every artifact ("cpu", "cuda", "rocm", "tpu").
    min_size, max_size: the resize the artifacts are served with (torchvision's transform).
    description: free text kept in the contract (e.g. the config and checkpoint).

  Returns:
    The path of the contract file.
  """
  from flax import traverse_util
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(variables)).items()}
  names = sorted(flat)
  treedef = jax.tree.structure(variables)

  def forward(weights, images, image_sizes, padded_sizes):
    tree = traverse_util.unflatten_dict({tuple(n.split("/")): w for n, w in zip(names, weights)})
    assert jax.tree.structure(tree) == treedef
    return model.apply(tree, images, image_sizes, padded_sizes)

  out = paths.as_path(paths.resolve(out_dir))
  out.mkdir(parents=True, exist_ok=True)
  batch = jax.export.symbolic_shape("b")[0]
  weight_specs = [jax.ShapeDtypeStruct(flat[n].shape, flat[n].dtype) for n in names]
  outputs = None
  artifacts = []
  for h, w in canvases:
    exported = jax.export.export(jax.jit(forward), platforms=tuple(platforms))(
        weight_specs, jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32),
        jax.ShapeDtypeStruct((batch, 2), jnp.int32), jax.ShapeDtypeStruct((batch, 2), jnp.int32))
    (out / artifact_name((h, w))).write_bytes(bytes(exported.serialize()))
    artifacts.append({"canvas": [h, w], "file": artifact_name((h, w))})
    keys = jax.tree.unflatten(exported.out_tree, list(range(len(exported.out_avals))))
    outputs = {k: {"shape": ["b"] + [int(d) for d in exported.out_avals[i].shape[1:]],
                   "dtype": str(exported.out_avals[i].dtype)} for k, i in keys.items()}
  with (out / WEIGHTS_FILE).open("wb") as f:
    np.savez(f, **flat)
  from maskrcnn_jax.data.preprocess import IMAGE_MEAN, IMAGE_STD
  contract = {
      "format": FORMAT, "version": VERSION, "description": description,
      "jax_version": jax.__version__, "platforms": list(platforms), "artifacts": artifacts,
      "weights": {"file": WEIGHTS_FILE, "names": names},
      "inputs": {
          "weights": "the arrays of weights.npz, as a list in weights.names order",
          "images": "[b, H, W, 3] float32: each image normalized ((x / 255 - mean) / std), "
                    "resized by preprocess.resize, at the top-left of a zero canvas H x W",
          "image_sizes": "[b, 2] int32 (h, w) of each resized image (blank slots: the canvas)",
          "padded_sizes": "[b, 2] int32 (h, w) rounded up to multiples of 32 (anchor frame)",
      },
      "outputs": outputs,
      "preprocess": {
          "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "min_size": int(min_size),
          "max_size": int(max_size), "size_divisible": 32,
          "resize": "torchvision GeneralizedRCNNTransform (eval): scale = min(min_size / "
                    "short side, max_size / long side), floor(side * scale), bilinear "
                    "align_corners=False after normalizing (maskrcnn_jax.data.preprocess)",
          "canvas": "the smallest listed canvas holding the padded size",
      },
      "postprocess": {
          "valid": "keep detections with valid; boxes are canvas pixels of the resized image",
          "boxes": "scaled by (orig_w / w, orig_h / h) in float32 (torchvision resize_boxes)",
          "masks": "[D, S, S] probabilities of the detected class, pasted as torchvision's "
                   "paste_masks_in_image (padding 1) into the original frame",
          "point_keys": list(model.point_keys),
      },
  }
  paths.write_text_atomic(paths.join(os.fspath(out), CONTRACT_FILE),
                          json.dumps(contract, indent=1) + "\n")
  return paths.join(os.fspath(out), CONTRACT_FILE)


def _flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "A training workdir: its newest checkpoint is exported.")
  flags.DEFINE_string("checkpoint", None, "One checkpoint folder, WORKDIR/checkpoints/STEP.")
  flags.DEFINE_string("torchvision_weights", None, "A torchvision state_dict (.pth) to convert.")
  flags.DEFINE_string("out", None, "Output folder (local or gs://...).")
  flags.DEFINE_string("platforms", "cpu,cuda,tpu", f"Comma-separated subset of {PLATFORMS}.")
  flags.DEFINE_string("canvases", None, "Comma-separated HxW canvases (multiples of 32); default: "
                      "the landscape and portrait canvases of config.input's min/max size.")
  return flags.FLAGS


def main(argv):
  from absl import flags as absl_flags

  from maskrcnn_jax.cli import fail
  flags = absl_flags.FLAGS
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}")
  if not flags.out:
    fail("--out is required")
  config = flags.config
  try:
    platforms = parse_platforms(flags.platforms)
    min_size, max_size = int(config.input.min_size), int(config.input.max_size)
    canvases = (parse_canvases(flags.canvases) if flags.canvases
                else default_canvases(min_size, max_size))
  except ValueError as e:
    fail(str(e))
  from maskrcnn_jax.training import sources
  try:
    loaded = sources.load(config, workdir=flags.workdir, checkpoint=flags.checkpoint,
                          torchvision_weights=flags.torchvision_weights)
  except sources.SourceError as e:
    fail(str(e))
  from maskrcnn_jax import paths
  try:  # before the minutes of lowering, not after
    paths.check_writable(flags.out)
  except OSError as e:
    fail(f"cannot write to --out {flags.out!r} ({e.strerror or e})")
  source = flags.workdir or flags.checkpoint or flags.torchvision_weights
  description = f"config {flags['config'].config_filename}, weights {source}"
  if loaded.step is not None:
    description += f" (step {loaded.step})"
  path = export_model(loaded.model, loaded.variables, flags.out, canvases=canvases,
                      platforms=platforms, min_size=min_size, max_size=max_size,
                      description=description)
  print(f"exported {len(canvases)} canvas(es) {['x'.join(map(str, c)) for c in canvases]} for "
        f"{list(platforms)}: {path}")


def _run():
  from absl import app

  from maskrcnn_jax.cli import check_config_file, fail, parse_flags, quiet_logs
  check_config_file(sys.argv[1:])
  quiet_logs()
  _flags()
  from maskrcnn_jax.training.checkpoint import CheckpointMismatchError
  from maskrcnn_jax.training.errors import ConfigError
  try:
    app.run(main, flags_parser=parse_flags)
  except (CheckpointMismatchError, ConfigError) as e:
    fail(str(e))


if __name__ == "__main__":
  _run()
