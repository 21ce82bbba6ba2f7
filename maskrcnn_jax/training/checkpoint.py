"""Checkpoints in WORKDIR/checkpoints with orbax: save, keep the last few, resume by itself.

A checkpoint is the whole `TrainState` (step, params, frozen BN statistics, optimizer state, RNG),
so a resumed run continues exactly where it stopped; the data pipeline skips the `step` batches
already consumed. Restoring tries the newest complete checkpoint first; an unreadable one
(truncated or missing array files, unreadable metadata) is reported by name, moved aside to
WORKDIR/checkpoints_corrupt/ and the previous one is tried. Interrupted saves (orbax's
`*.orbax-checkpoint-tmp-*` folders) never count as checkpoints; they are reported and removed.
A checkpoint whose arrays do not have the shapes the config asks for is an error (no fallback:
the older ones were written by the same run).
"""
import logging
import os
import time
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from maskrcnn_jax import paths

log = logging.getLogger(__name__)

TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint does not fit the configured model/optimizer."""


def _sync(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _flat_shapes(tree, serialize: bool = False):
  """{'params.backbone.conv1.kernel': shape} of a checkpoint's metadata tree (nested dicts and
  lists, as orbax stores a pytree) or, with `serialize`, of a pytree such as a TrainState."""
  if serialize:
    tree = ocp.tree.serialize_tree(tree, keep_empty_nodes=True)
  out = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, prefix + (str(k),))
    elif isinstance(node, (list, tuple)):
      for i, v in enumerate(node):
        walk(v, prefix + (str(i),))
    elif hasattr(node, "shape"):
      out[".".join(prefix)] = tuple(node.shape)
  walk(tree, ())
  return out


def _is_partial(abstract_state) -> bool:
  """A dict of some of a TrainState's fields (e.g. {'step', 'params', 'batch_stats'} for
  evaluation) rather than a whole TrainState."""
  return isinstance(abstract_state, dict)


class _DropReadOnlyNotice(logging.Filter):
  """orbax warns 'Given directory is read only' whenever a manager is opened read-only, which is
  what evaluation asks for: not worth a line on the user's console."""

  def filter(self, record):
    return "Given directory is read only" not in record.getMessage()


def _first_line(error: BaseException) -> str:
  """'TypeName: first line of the message' (at most 300 characters of it)."""
  first = (str(error).strip().splitlines() or [""])[0][:300]
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


class Checkpointer:
  """Saves and restores `TrainState`s under `directory` (WORKDIR/checkpoints)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    """`read_only` (evaluation): never creates, cleans up, moves or saves anything."""
    self.directory = paths.resolve(directory)  # a gs:// URL stays one
    self.read_only = bool(read_only)
    if self.read_only:
      absl_logger = logging.getLogger("absl")  # orbax logs through absl.logging
      if not any(isinstance(f, _DropReadOnlyNotice) for f in absl_logger.filters):
        absl_logger.addFilter(_DropReadOnlyNotice())
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False, max_to_keep=None,
          save_interval_steps=0, enable_async_checkpointing=False)
    else:
      self._report_partial_saves()
      options = ocp.CheckpointManagerOptions(
          max_to_keep=int(keep) if keep else None, create=True, cleanup_tmp_directories=True,
          enable_async_checkpointing=bool(async_save))
    # Read-only managers restore through the PyTree handler, which reads a part of a checkpoint
    # (evaluation reads the parameters, never the optimizer state); the files are the same.
    handler = ocp.PyTreeCheckpointHandler() if self.read_only else ocp.StandardCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handler)

  def _report_partial_saves(self):
    directory = paths.as_path(self.directory)
    if not directory.is_dir():
      return
    for name in sorted(p.name for p in directory.iterdir()):
      if TMP_MARK in name:
        log.warning("ignoring the partial checkpoint %s (an interrupted save); it is removed",
                    paths.join(self.directory, name))

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def save(self, step: int, state) -> bool:
    """Saves `state` (whose `step` is `step`) unless that step is saved already.

    Asynchronous by default: the arrays are copied off the devices before this returns (so the
    state may be donated to the next step) and written in the background; `wait` blocks.
    """
    if step in self.manager.all_steps():
      return False
    return self.manager.save(int(step), args=ocp.args.StandardSave(state), force=True)

  def check_shapes(self, step: int, abstract_state):
    """Raises CheckpointMismatchError naming every array whose shape (or presence) differs (for
    a partial `abstract_state`, within the parts it holds)."""
    stored = _flat_shapes(self.manager.item_metadata(step).tree)
    wanted = _flat_shapes(abstract_state, serialize=True)
    if _is_partial(abstract_state):
      stored = {k: v for k, v in stored.items() if k.split(".", 1)[0] in abstract_state}
    problems = []
    for k in sorted(set(stored) | set(wanted)):
      if k not in stored:
        problems.append(f"{k}: not in the checkpoint (config wants {wanted[k]})")
      elif k not in wanted:
        problems.append(f"{k}: in the checkpoint {stored[k]}, not in the config")
      elif stored[k] != wanted[k]:
        problems.append(f"{k}: checkpoint {stored[k]} vs config {wanted[k]}")
    if problems:
      shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
      raise CheckpointMismatchError(
          f"the checkpoint {self.path(step)} does not fit the config ({len(problems)} arrays "
          "differ): use a new --workdir, or the config this workdir was trained with "
          "(config.json there).\n  " + "\n  ".join(shown))

  def restore_latest(self, abstract_state) -> Tuple[Optional[Any], Optional[int]]:
    """The newest readable checkpoint restored into `abstract_state`'s structure and shardings.

    `abstract_state` is a TrainState, or a dict of some of its fields (e.g. {'step', 'params',
    'batch_stats'} for evaluation: the optimizer state is then never read).

    Returns (state, step), or (None, None) when there is no checkpoint. Unreadable checkpoints are
    reported, moved to `<workdir>/checkpoints_corrupt/` (unless read-only) and skipped.

    Raises:
      CheckpointMismatchError: the newest checkpoint's shapes do not fit `abstract_state`.
      RuntimeError: checkpoints exist but none is readable.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    bad = []
    for step in steps:
      try:
        metadata_ok = True
        self.check_shapes(step, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # unreadable metadata: a corrupt checkpoint
        metadata_ok, error = False, e
      if metadata_ok:
        try:
          state = self._restore_arrays(step, abstract_state)
        except Exception as e:  # truncated/missing array files, bad metadata, ...
          error = e
        else:
          if bad and not self.read_only:
            self._move_aside(bad)
          return state, step
      log.warning("checkpoint %s is unreadable (%s); trying the previous one", self.path(step),
                  _first_line(error))
      log.debug("restoring %s failed", self.path(step), exc_info=error)
      bad.append(step)
    if bad:
      raise RuntimeError(f"no readable checkpoint in {self.directory}: steps {sorted(bad)} all "
                         "failed to restore (see the warnings above)")
    return None, None

  def restore(self, step: int, abstract_state):
    """Checkpoint `step` restored into `abstract_state`'s structure and shardings (no fallback).

    Raises:
      CheckpointMismatchError: its shapes do not fit `abstract_state`.
      FileNotFoundError: there is no checkpoint `step`.
      RuntimeError: it cannot be read (the first line of the reason is in the message).
    """
    if step not in self.manager.all_steps():
      raise FileNotFoundError(f"no checkpoint {self.path(step)} (steps here: {self.steps()})")
    try:
      self.check_shapes(step, abstract_state)
    except CheckpointMismatchError:
      raise
    except Exception as e:
      raise RuntimeError(f"checkpoint {self.path(step)} is unreadable: {_first_line(e)}") from e
    try:
      return self._restore_arrays(step, abstract_state)
    except Exception as e:
      raise RuntimeError(f"checkpoint {self.path(step)} is unreadable: {_first_line(e)}") from e

  def _restore_arrays(self, step: int, abstract_state):
    partial = _is_partial(abstract_state)
    if self.read_only:
      args = ocp.args.PyTreeRestore(
          item=abstract_state, partial_restore=partial,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    elif partial:
      raise ValueError("a partial restore needs a read-only Checkpointer")
    else:
      args = ocp.args.StandardRestore(abstract_state)
    state = self.manager.restore(step, args=args)
    step_array = state["step"] if partial else state.step
    if isinstance(step_array, jax.Array):  # also when not fully addressable (multi-host)
      step_array = step_array.addressable_data(0)
    restored_step = int(np.asarray(step_array))
    if restored_step != step:
      raise ValueError(f"it holds step {restored_step}")
    return state

  def _move_aside(self, steps):
    """Moves unreadable checkpoints out of the way, so the resumed run can save those steps."""
    self.manager.wait_until_finished()
    target = paths.as_path(self.directory).parent / "checkpoints_corrupt"
    if jax.process_index() == 0:
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dst = os.fspath(target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        paths.as_path(self.path(step)).rename(dst)
        log.warning("moved the unreadable checkpoint %s to %s", self.path(step), dst)
    _sync("maskrcnn_jax_move_corrupt_checkpoints")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
