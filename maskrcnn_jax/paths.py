"""Paths that may be local or on cloud storage (`gs://bucket/run`, `s3://...`).

A URL is never made local: `os.path.abspath("gs://b/x")` is `<cwd>/gs:/b/x`, a silent wrong
folder. Workdirs, checkpoint folders and evaluation outputs go through `resolve` (URLs kept, local
paths made absolute) and `epath.Path` (etils, the path library orbax uses; cloud URLs through
TensorFlow's gfile), never through `os.path`/`open`/`shutil` directly. TensorBoard's writer and
orbax take the URL strings as they are.
"""
import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(path: PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...)."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
  """A URL unchanged; a local path with `~` expanded, made absolute."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def as_path(path: PathLike) -> epath.Path:
  """`resolve(path)` as an `epath.Path` (exists, is_dir, mkdir, iterdir, open, rename, ...)."""
  return epath.Path(resolve(path))


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string, for local paths and URLs alike."""
  return os.fspath(as_path(path).joinpath(*parts))


def check_writable(path: PathLike) -> None:
  """Creates folder `path` (local or a URL) if needed and writes and removes a probe file in it.

  Raises:
    OSError: it cannot be written, with the backend's reason (cloud backends' own errors are
      turned into OSError).
  """
  p = as_path(path)
  try:
    p.mkdir(parents=True, exist_ok=True)
    probe = p / f".write_test_{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError:
    raise
  except Exception as e:  # noqa: BLE001 (e.g. TensorFlow's errors for gs:// URLs)
    raise OSError(str(e)) from e


def write_text_atomic(path: PathLike, text: str) -> None:
  """Writes `text` to `path` whole or not at all (a temporary file renamed over it)."""
  p = as_path(path)
  tmp = p.parent / (p.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(p)
