"""Errors the training entry point reports in one line (no traceback)."""


class ConfigError(ValueError):
  """A config value or combination the training code cannot use; the message says which."""
