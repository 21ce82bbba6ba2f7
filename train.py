"""Trains Mask R-CNN: `python train.py --config configs/shapes.py --workdir /tmp/shapes`.

Override any config field on the command line, e.g. `--config.training.steps=100`. Rerunning
with the same --workdir resumes from its newest checkpoint.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from maskrcnn_jax.cli import check_config_file, fail as _fail, parse_flags, quiet_logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, TensorBoard logs and config.json.")


def _check_workdir(workdir: str):
  """A local folder or a URL (gs://...; never turned into a local path) that can be written."""
  from maskrcnn_jax import paths
  try:
    paths.check_writable(workdir)
  except OSError as e:
    _fail(f"cannot write to --workdir {workdir!r}: {e.strerror or e}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if FLAGS.workdir is None:
    _fail("--workdir is required")
  _check_workdir(FLAGS.workdir)
  config = FLAGS.config

  quiet_logs()
  # TensorFlow only feeds the input pipeline: keep it off the accelerators jax uses.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  from maskrcnn_jax.training import checkpoint, errors, trainer
  try:
    evaluate = None
    if int(config.training.get("eval_every", 0)) > 0:
      from maskrcnn_jax.evaluation.evaluator import make_training_evaluator
      evaluate = make_training_evaluator(config)
    trainer.train_and_evaluate(config, FLAGS.workdir, evaluate=evaluate)
  except (trainer.NonFiniteError, checkpoint.CheckpointMismatchError, errors.ConfigError) as e:
    _fail(str(e))


if __name__ == "__main__":
  check_config_file(sys.argv[1:])
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from configs import base`
  app.run(main, flags_parser=parse_flags)
