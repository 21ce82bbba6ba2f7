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
