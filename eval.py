"""Evaluates a detector with COCO AP (box, and mask for models with a mask head), or predicts on
image files.

    python eval.py --config configs/shapes.py --workdir /tmp/shapes          # newest checkpoint
    python eval.py --config configs/shapes.py --checkpoint /tmp/shapes/checkpoints/1000
    python eval.py --config configs/shapes.py --torchvision_weights w.pth     # converted weights
    python eval.py --config configs/shapes.py --workdir /tmp/shapes --images photos/ --out_dir out

Writes COCO results (results.json), metrics.json (12 COCO numbers and per-category AP for each task
the model predicts: bbox, and segm with masks) and pictures (PNG) into --out_dir (default
WORKDIR/eval/final; with --checkpoint
WORKDIR/eval/step_STEP; with --torchvision_weights or a checkpoint outside a workdir ./eval_out),
and the AP to the workdir's TensorBoard logs.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "A training workdir: its newest checkpoint is evaluated.")
flags.DEFINE_string("checkpoint", None,
                    "One checkpoint folder, WORKDIR/checkpoints/STEP, to evaluate instead.")
flags.DEFINE_string("torchvision_weights", None,
                    "A torchvision Mask R-CNN state_dict (.pth) to convert and evaluate instead.")
flags.DEFINE_string("split", None, "Dataset split (default config.data.eval_split or validation).")
flags.DEFINE_string("out_dir", None, "Output folder (default WORKDIR/eval/final, with "
                    "--checkpoint WORKDIR/eval/step_STEP, else ./eval_out).")
flags.DEFINE_integer("num_pictures", 8, "Images to draw with their predictions.")
flags.DEFINE_integer("max_images", None, "Evaluate only the first N images of the split.")
flags.DEFINE_multi_string("images", None, "Image files or folders to predict on (no AP).")
flags.DEFINE_float("score_threshold", 0.5, "Pictures: draw detections scoring at least this.")


class UsageError(Exception):
  pass


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  config = FLAGS.config
  sources = [f for f in ("workdir", "checkpoint", "torchvision_weights") if FLAGS[f].value]
  if len(sources) != 1:
    raise UsageError("pass exactly one of --workdir, --checkpoint and --torchvision_weights")
  from maskrcnn_jax.cli import quiet_logs
  quiet_logs()
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import jax

  from maskrcnn_jax import paths
  from maskrcnn_jax.evaluation import evaluator, inference
  from maskrcnn_jax.training import sources
  try:
    loaded = sources.load(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                          torchvision_weights=FLAGS.torchvision_weights)
  except sources.SourceError as e:
    raise UsageError(str(e)) from None
  model, variables, step, workdir = loaded.model, loaded.variables, loaded.step, loaded.workdir
  # Converted torchvision weights: classes are COCO category ids; names are not known here.
  label_map = loaded.label_map
  default_out = os.path.abspath("eval_out")
  if workdir is not None:
    default_out = paths.join(workdir, "eval", "final" if FLAGS.workdir else f"step_{step}")
  out_dir = paths.resolve(FLAGS.out_dir or default_out)
  try:
    paths.check_writable(out_dir)
  except OSError as e:
    raise UsageError(f"cannot write to {out_dir!r} ({e.strerror or e}): pass "
                     "--out_dir") from None
  inp = config.input

  if FLAGS.images:
    from maskrcnn_jax.evaluation.images import export_predictions, load_images
    try:
      images, names, skipped = load_images(FLAGS.images)
    except ValueError as e:
      raise UsageError(str(e)) from None
    for line in skipped:
      print(f"eval.py: skipped {line}")
    class_names = label_map[1] if label_map else None
    if class_names is None and config.data.get("dataset"):
      from maskrcnn_jax.training import data_source
      _, class_names = evaluator.load_label_map(data_source.prepare_builder(config.data))
    records = export_predictions(
        model, variables, images, names, out_dir, class_names=class_names,
        score_threshold=FLAGS.score_threshold, min_size=int(inp.min_size),
        max_size=int(inp.max_size), bucket=int(inp.bucket), batch_size=int(inp.batch_size))
    print(f"wrote {len(images)} pictures and predictions.json ({len(records)} detections) to "
          f"{out_dir}")
    return

  from maskrcnn_jax.training import data_source
  builder = data_source.prepare_builder(config.data)
  split = FLAGS.split or config.data.get("eval_split", "validation")
  before = inference.TRACE_COUNTS["forward"]
  kwargs = {}
  if label_map is not None:
    kwargs = dict(label_to_category=label_map[0], class_names=label_map[1])
  try:
    summary = evaluator.evaluate_split(
        model, variables, builder, split, min_size=int(inp.min_size), max_size=int(inp.max_size),
        bucket=int(inp.bucket), batch_size=int(inp.batch_size), max_images=FLAGS.max_images,
        out_dir=out_dir, num_pictures=FLAGS.num_pictures, **kwargs)
  except evaluator.SplitError as e:  # unknown or empty split
    raise UsageError(str(e)) from None
  print(f"compiled the forward pass {inference.TRACE_COUNTS['forward'] - before} time(s) for "
        f"{summary['num_images']} images")
  if workdir is not None and jax.process_index() == 0:
    from maskrcnn_jax.training.trainer import SummaryWriter
    writer = SummaryWriter(paths.join(workdir, "tensorboard"))
    writer.scalars(step, evaluator.headline_metrics(summary), "eval")
    writer.flush()
  print(f"results.json, metrics.json and pictures in {out_dir}")


def _run():
  from maskrcnn_jax.cli import check_config_file, fail, parse_flags
  check_config_file(sys.argv[1:])
  from maskrcnn_jax.training.checkpoint import CheckpointMismatchError
  from maskrcnn_jax.training.errors import ConfigError
  try:
    app.run(main, flags_parser=parse_flags)
  except (UsageError, CheckpointMismatchError, ConfigError) as e:
    fail(str(e))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  _run()
