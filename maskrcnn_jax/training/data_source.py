"""`config.data` -> a prepared tfds dataset and the training batch iterator.

config.data.dataset:
  'shapes': the synthetic shapes (`maskrcnn_jax.data.shapes`), generated on first use into
    `config.data.cache_dir` (default ~/.cache/maskrcnn_jax/shapes-<hash of config.data.shapes>)
    and prepared with `prepare_coco_format` into `<cache_dir>/tfds`; later runs reuse both.
  'coco_format': the COCO-format folder `config.data.root` (COCO 2017 layout or
    `annotations/instances_<split>.json` + `<split>/`), prepared into `config.data.tfds_dir`
    (default ~/tensorflow_datasets).
With several processes, process 0 prepares first and the others then open the result.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from typing import Any, Dict, Iterator, Mapping

import jax
from jax.experimental import multihost_utils

from maskrcnn_jax.data import make_dataset, prepare_coco_format
from maskrcnn_jax.data.shapes import generate_shapes
from maskrcnn_jax.training.errors import ConfigError

DEFAULT_CACHE = os.path.join("~", ".cache", "maskrcnn_jax")
SHAPES_KEYS = ("num_train", "num_val", "seed", "image_size", "min_objects", "max_objects",
               "min_visible_fraction")


@contextlib.contextmanager
def _file_lock(path):
  """Serializes dataset preparation between processes of one machine."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def shapes_params(data: Mapping[str, Any]) -> Dict[str, Any]:
  shapes = dict(data.get("shapes", {}))
  unknown = set(shapes) - set(SHAPES_KEYS)
  if unknown:
    raise ConfigError(f"config.data.shapes has unknown keys {sorted(unknown)}; "
                      f"known: {list(SHAPES_KEYS)}")
  defaults = dict(num_train=1000, num_val=100, seed=0, image_size=128, min_objects=1,
                  max_objects=6, min_visible_fraction=0.5)
  defaults.update({k: float(v) if k == "min_visible_fraction" else int(v)
                   for k, v in shapes.items()})
  return defaults


def shapes_cache_dir(data: Mapping[str, Any]) -> str:
  """`config.data.cache_dir`, or ~/.cache/maskrcnn_jax/shapes-<hash of the generation params>."""
  if data.get("cache_dir"):
    return os.path.abspath(os.path.expanduser(data["cache_dir"]))
  params = shapes_params(data)
  digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
  return os.path.abspath(os.path.expanduser(os.path.join(DEFAULT_CACHE, f"shapes-{digest}")))


def _ensure_shapes(data: Mapping[str, Any]):
  root = shapes_cache_dir(data)
  params = shapes_params(data)
  done = os.path.join(root, "shapes.json")
  with _file_lock(root + ".lock"):
    if os.path.exists(done):
      with open(done) as f:
        stored = json.load(f)
      if stored != params:
        raise ConfigError(
            f"{root} holds shapes generated with {stored}, but the config asks for {params}: "
            "point config.data.cache_dir elsewhere (or delete that folder to regenerate it)")
    else:
      print(f"generating the synthetic shapes dataset in {root} ({params})", flush=True)
      tmp = f"{root}.tmp-{os.getpid()}"
      shutil.rmtree(tmp, ignore_errors=True)
      generate_shapes(tmp, params["num_train"], params["num_val"], params["seed"],
                      params["image_size"], min_objects=params["min_objects"],
                      max_objects=params["max_objects"],
                      min_visible_fraction=params["min_visible_fraction"])
      with open(os.path.join(tmp, "shapes.json"), "w") as f:
        json.dump(params, f)
      shutil.rmtree(root, ignore_errors=True)
      os.rename(tmp, root)
    builder = prepare_coco_format(root, os.path.join(root, "tfds"))
  return builder


def validate(data: Mapping[str, Any]):
  """Raises ConfigError for a dataset that cannot be found (before anything slow happens)."""
  dataset = data.get("dataset", "shapes")
  if dataset == "shapes":
    shapes_params(data)
  elif dataset == "coco_format":
    root = data.get("root") or ""
    if not root:
      raise ConfigError("config.data.dataset='coco_format' needs config.data.root, a COCO-format "
                        "folder (e.g. --config.data.root=/data/coco)")
    if not os.path.isdir(os.path.expanduser(root)):
      raise ConfigError(f"config.data.root={root!r} is not a folder")
  else:
    raise ConfigError(f"config.data.dataset must be 'shapes' or 'coco_format', got {dataset!r}")


def _prepare(data: Mapping[str, Any]):
  validate(data)
  if data.get("dataset", "shapes") == "shapes":
    return _ensure_shapes(data)
  tfds_dir = os.path.expanduser(data.get("tfds_dir") or os.path.join("~", "tensorflow_datasets"))
  with _file_lock(os.path.join(tfds_dir, ".maskrcnn_jax_prepare.lock")):
    return prepare_coco_format(os.path.expanduser(data["root"]), tfds_dir,
                               num_workers=int(data.get("prepare_workers", 1)))


def prepare_builder(data: Mapping[str, Any]):
  """The tfds builder of `config.data`, preparing the data first if needed (see module doc)."""
  if jax.process_count() == 1:
    return _prepare(data)
  builder = _prepare(data) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("maskrcnn_jax_prepare_data")
  return builder if builder is not None else _prepare(data)


def train_iterator(builder, data: Mapping[str, Any], batch_size: int, start_batch: int,
                   seed: int) -> Iterator[Dict[str, Any]]:
  """This process's training batches (`batch_size` per process) from batch `start_batch` on."""
  scale_range = tuple(data.get("scale_range", (1.0, 1.0)))
  return make_dataset(
      builder, data.get("train_split", "train"), batch_size=batch_size, training=True,
      image_size=tuple(data["image_size"]), max_instances=int(data.get("max_instances", 100)),
      mask_crop_size=int(data.get("mask_crop_size", 112)), seed=seed,
      shuffle_buffer=int(data.get("shuffle_buffer", 1024)), resize=data.get("resize", "fit"),
      min_size=_int_or_tuple(data.get("min_size", 800)),
      max_size=int(data.get("max_size", 1333)),
      scale_range=None if scale_range == (1.0, 1.0) else scale_range,
      flip_prob=float(data.get("flip_prob", 0.5)),
      max_crowd_instances=int(data.get("max_crowd_instances", 20)),
      process_index=jax.process_index(), process_count=jax.process_count(),
      start_batch=int(start_batch))


def _int_or_tuple(v):
  if isinstance(v, (list, tuple)):
    return tuple(int(x) for x in v)
  return int(v)
