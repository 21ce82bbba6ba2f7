"""Where a trained model comes from, for the command lines that use one (eval.py, export).

Exactly one of: a training workdir (its newest readable checkpoint), one checkpoint folder
(`WORKDIR/checkpoints/STEP`), or a torchvision Mask R-CNN state_dict (`.pth`, converted). Only the
parameters and batch-norm statistics are read; no optimizer is built.
"""
import os
import re
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import jax

from maskrcnn_jax import paths


class SourceError(ValueError):
  """A source that does not exist, holds no checkpoint, or is not of this model: one line."""


class Loaded(NamedTuple):
  model: Any  # MaskRCNN
  variables: Dict[str, Any]  # {'params', 'batch_stats'} as host numpy arrays
  step: Optional[int]  # the checkpoint's step; None for converted torchvision weights
  workdir: Optional[str]  # the training workdir it came from, if any
  # (label -> category id, class names) for converted weights (contiguous ids); None otherwise.
  label_map: Optional[Tuple[Dict[int, int], Sequence[str]]]


def checkpoint_source(workdir: str = None, checkpoint: str = None) -> Tuple[str, Optional[int],
                                                                          Optional[str]]:
  """(checkpoints folder, step or None for the newest, workdir or None) from a workdir or one
  checkpoint folder. A checkpoint folder's workdir is the folder above `checkpoints/`, if it sits
  in one. Local folders and URLs (gs://...) alike; a URL is never made local."""
  if workdir:
    resolved = paths.resolve(workdir)
    if not paths.as_path(resolved).is_dir():
      raise SourceError(f"--workdir {workdir!r} does not exist")
    ckpt_dir = paths.join(resolved, "checkpoints")
    if not paths.as_path(ckpt_dir).is_dir():
      raise SourceError(f"--workdir {workdir!r} has no checkpoints/ folder (train first, or "
                        "pass --torchvision_weights)")
    return ckpt_dir, None, resolved
  path = paths.as_path(checkpoint)
  if not path.is_dir():
    raise SourceError(f"--checkpoint {checkpoint!r} does not exist")
  if not re.fullmatch(r"0|[1-9][0-9]*", path.name):  # orbax's step folder names
    raise SourceError(f"--checkpoint {checkpoint!r} is not a checkpoint folder "
                      "(WORKDIR/checkpoints/STEP)")
  ckpt_dir = path.parent
  parent = os.fspath(ckpt_dir.parent) if ckpt_dir.name == "checkpoints" else None
  return os.fspath(ckpt_dir), int(path.name), parent


def restore_for_inference(config, ckpt_dir: str, step: int = None):
  """(model, host variables, step) of checkpoint `step` (default: the newest readable one) in
  `ckpt_dir` (WORKDIR/checkpoints), for the model built from `config`."""
  from maskrcnn_jax.training import checkpoint, parallel, trainer
  model = trainer.model_from_config(config)
  abstract = trainer.abstract_inference_state(model, parallel.make_mesh(jax.devices()[:1]))
  ckpt = None
  try:
    ckpt = checkpoint.Checkpointer(ckpt_dir, read_only=True)
    if step is None:
      state, step = ckpt.restore_latest(abstract)
    else:
      state = ckpt.restore(step, abstract)
  except (RuntimeError, OSError) as e:  # unreadable checkpoints, missing step, permissions
    raise SourceError(str(e)) from None
  finally:
    if ckpt is not None:
      ckpt.close()
  if state is None:
    raise SourceError(f"{os.path.dirname(ckpt_dir)!r} holds no checkpoint yet")
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  return model, jax.device_get(variables), int(step)


def load(config, *, workdir: str = None, checkpoint: str = None,
         torchvision_weights: str = None) -> Loaded:
  """The model of `config` with the variables of exactly one source (see the module docstring).

  Raises:
    SourceError: none or several sources, or one that cannot be read as this model.
    ConfigError / CheckpointMismatchError (training.errors): a config or checkpoint of another
      model.
  """
  given = [n for n, v in (("--workdir", workdir), ("--checkpoint", checkpoint),
                          ("--torchvision_weights", torchvision_weights)) if v]
  if len(given) != 1:
    raise SourceError("pass exactly one of --workdir, --checkpoint and --torchvision_weights")
  if not torchvision_weights:
    ckpt_dir, step, parent = checkpoint_source(workdir, checkpoint)
    model, variables, step = restore_for_inference(config, ckpt_dir, step)
    print(f"loaded {ckpt_dir} at step {step}")
    return Loaded(model, variables, step, parent, None)
  from maskrcnn_jax.convert import from_torchvision
  if not os.path.isfile(torchvision_weights):
    raise SourceError(f"--torchvision_weights {torchvision_weights!r} does not exist")
  num_classes = int(config.model.num_classes)
  try:
    model, variables = from_torchvision(torchvision_weights, num_classes=num_classes,
                                        model_config=config.model)
  except (ValueError, TypeError, KeyError) as e:  # not a state_dict, or not of this model
    raise SourceError(f"--torchvision_weights {torchvision_weights!r}: {e}") from None
  label_map = ({k: k for k in range(1, num_classes)}, [str(k) for k in range(num_classes)])
  return Loaded(model, variables, None, None, label_map)
