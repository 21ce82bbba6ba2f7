"""Shared command-line helpers of train.py and eval.py (no flags defined here)."""
import os
import sys


def fail(message: str):
  """One clear line on stderr and exit 2, instead of a stack trace."""
  print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
  sys.exit(2)


def config_file_from_argv(argv):
  """The value of --config in argv, or None."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return None


def check_config_file(argv):
  """Fails in one line when --config is absent or names no file (config_flags would report
  either with a long traceback)."""
  path = config_file_from_argv(argv)
  if path is None:
    fail("--config is required, e.g. --config configs/shapes.py")
  if not os.path.isfile(path.split(":", 1)[0]):
    fail(f"config file not found: {path}")


def parse_flags(argv):
  """absl's flag parser for `app.run(..., flags_parser=parse_flags)`, with a bad flag or a
  config override of a field that does not exist reported in one line."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: --config.<field that does not exist>
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    fail(f"unknown config field in {' '.join(bad)} ({e})")


def quiet_logs():
  """Keeps the console to our progress and results: TensorFlow's C++ notices off (call before
  TensorFlow is imported), jax's/orbax's/tfds's Python INFO chatter off (absl turns it on)."""
  import logging
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("maskrcnn_jax").setLevel(logging.INFO)
