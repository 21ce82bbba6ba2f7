"""`config.data` -> a prepared tfds dataset and the training batch iterator.

config.data.dataset:
  'shapes': the synthetic shapes (`maskrcnn_jax.data.shapes`), generated on first use into
    `config.data.cache_dir` (default ~/.cache/maskrcnn_jax/shapes-<hash of config.data.shapes>)
    and prepared with `prepare_coco_format` into `<cache_dir>/tfds`; later runs reuse both.
  'keypoint_shapes': the synthetic stick figures with keypoints
    (`maskrcnn_jax.data.keypoint_shapes`), likewise from `config.data.keypoint_shapes` into
    `config.data.cache_dir` (default ~/.cache/maskrcnn_jax/keypoint_shapes-<hash>), prepared with
    annotations='person_keypoints'.
  'coco_format': the COCO-format folder `config.data.root` (COCO 2017 layout or
    `annotations/<annotations>_<split>.json` + `<split>/`, `config.data.annotations` 'instances'
    or 'person_keypoints'), prepared into `config.data.tfds_dir` (default ~/tensorflow_datasets).
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

from maskrcnn_jax.data import generate_keypoint_shapes, make_dataset, prepare_coco_format
from maskrcnn_jax.data.shapes import generate_shapes
from maskrcnn_jax.training.errors import ConfigError

DEFAULT_CACHE = os.path.join("~", ".cache", "maskrcnn_jax")
DATASETS = ("shapes", "keypoint_shapes", "coco_format")
ANNOTATIONS = ("instances", "person_keypoints")
SHAPES_KEYS = ("num_train", "num_val", "seed", "image_size", "min_objects", "max_objects",
               "min_visible_fraction")
KEYPOINT_SHAPES_KEYS = ("num_train", "num_val", "seed", "image_size", "min_figures",
                        "max_figures", "min_visible_fraction", "max_overlap")
_FLOAT_KEYS = ("min_visible_fraction", "max_overlap")
# Every key of config.data (configs/base.py data_config), and of its generator sections.
DATA_KEYS = ("dataset", "root", "annotations", "tfds_dir", "prepare_workers", "cache_dir",
             "shapes", "keypoint_shapes", "train_split", "eval_split", "image_size", "resize",
             "min_size", "max_size", "scale_range", "flip_prob", "max_instances",
             "max_crowd_instances", "mask_crop_size", "min_keypoints_per_image",
             "keypoint_flip_permutation", "shuffle_buffer", "seed", "image_dtype", "mask_dtype")
SECTION_KEYS = {"shapes": SHAPES_KEYS, "keypoint_shapes": KEYPOINT_SHAPES_KEYS}
_DEFAULTS = {
    "shapes": dict(num_train=1000, num_val=100, seed=0, image_size=128, min_objects=1,
                   max_objects=6, min_visible_fraction=0.5),
    "keypoint_shapes": dict(num_train=1000, num_val=100, seed=0, image_size=128, min_figures=1,
                            max_figures=4, min_visible_fraction=0.5, max_overlap=0.3),
}


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


def _synthetic_params(data: Mapping[str, Any], kind: str) -> Dict[str, Any]:
  section = dict(data.get(kind, {}) or {})
  known = SECTION_KEYS[kind]
  unknown = set(section) - set(known)
  if unknown:
    raise ConfigError(f"config.data.{kind} has unknown keys {sorted(unknown)}; "
                      f"known: {list(known)}")
  params = dict(_DEFAULTS[kind])
  params.update({k: float(v) if k in _FLOAT_KEYS else int(v) for k, v in section.items()})
  return params


def shapes_params(data: Mapping[str, Any]) -> Dict[str, Any]:
  """`config.data.shapes` over its defaults (the generation parameters of 'shapes')."""
  return _synthetic_params(data, "shapes")


def keypoint_shapes_params(data: Mapping[str, Any]) -> Dict[str, Any]:
  """`config.data.keypoint_shapes` over its defaults (the parameters of 'keypoint_shapes')."""
  return _synthetic_params(data, "keypoint_shapes")


def shapes_cache_dir(data: Mapping[str, Any], kind: str = "") -> str:
  """`config.data.cache_dir`, or ~/.cache/maskrcnn_jax/<kind>-<hash of the generation params>;
  `kind` 'shapes' or 'keypoint_shapes', default: config.data.dataset when it is one of them, else
  'shapes'."""
  if not kind:
    kind = data.get("dataset", "shapes")
    kind = kind if kind in SECTION_KEYS else "shapes"
  if data.get("cache_dir"):
    return os.path.abspath(os.path.expanduser(data["cache_dir"]))
  params = _synthetic_params(data, kind)
  digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
  return os.path.abspath(os.path.expanduser(os.path.join(DEFAULT_CACHE, f"{kind}-{digest}")))


def _generate(kind: str, out: str, params: Mapping[str, Any]):
  common = (out, params["num_train"], params["num_val"], params["seed"], params["image_size"])
  if kind == "shapes":
    generate_shapes(*common, min_objects=params["min_objects"], max_objects=params["max_objects"],
                    min_visible_fraction=params["min_visible_fraction"])
  else:
    generate_keypoint_shapes(*common, min_figures=params["min_figures"],
                             max_figures=params["max_figures"],
                             min_visible_fraction=params["min_visible_fraction"],
                             max_overlap=params["max_overlap"])


def _ensure_synthetic(data: Mapping[str, Any], kind: str):
  """Generates (once) the synthetic set `kind` into its cache folder and prepares it."""
  root = shapes_cache_dir(data, kind)
  params = _synthetic_params(data, kind)
  done = os.path.join(root, f"{kind}.json")
  with _file_lock(root + ".lock"):
    if os.path.exists(done):
      with open(done) as f:
        stored = json.load(f)
      if stored != params:
        raise ConfigError(
            f"{root} holds {kind} generated with {stored}, but the config asks for {params}: "
            "point config.data.cache_dir elsewhere (or delete that folder to regenerate it)")
    else:
      if os.path.isdir(root) and os.listdir(root):
        raise ConfigError(f"{root} is not empty and holds no {kind}.json (another dataset?): "
                          "point config.data.cache_dir elsewhere")
      print(f"generating the synthetic {kind} dataset in {root} ({params})", flush=True)
      tmp = f"{root}.tmp-{os.getpid()}"
      shutil.rmtree(tmp, ignore_errors=True)
      _generate(kind, tmp, params)
      with open(os.path.join(tmp, f"{kind}.json"), "w") as f:
        json.dump(params, f)
      shutil.rmtree(root, ignore_errors=True)
      os.rename(tmp, root)
    annotations = "person_keypoints" if kind == "keypoint_shapes" else "instances"
    builder = prepare_coco_format(root, os.path.join(root, "tfds"), annotations=annotations)
  return builder


def validate(data: Mapping[str, Any]):
  """Raises ConfigError for a dataset that cannot be found or a malformed data setting (before
  anything slow happens)."""
  dataset = data.get("dataset", "shapes")
  if dataset in SECTION_KEYS:
    _synthetic_params(data, dataset)
  elif dataset == "coco_format":
    root = data.get("root") or ""
    if not root:
      raise ConfigError("config.data.dataset='coco_format' needs config.data.root, a COCO-format "
                        "folder (e.g. --config.data.root=/data/coco)")
    if not os.path.isdir(os.path.expanduser(root)):
      raise ConfigError(f"config.data.root={root!r} is not a folder")
  else:
    raise ConfigError(f"config.data.dataset must be one of {list(DATASETS)}, got {dataset!r}")
  annotations = data.get("annotations", "instances")
  if annotations not in ANNOTATIONS:
    raise ConfigError(f"config.data.annotations must be one of {list(ANNOTATIONS)}, got "
                      f"{annotations!r}")
  try:
    min_kp = int(data.get("min_keypoints_per_image", 0))
    perm = [int(p) for p in data.get("keypoint_flip_permutation", ()) or ()]
  except (TypeError, ValueError):
    raise ConfigError("config.data.min_keypoints_per_image must be an int and "
                      "config.data.keypoint_flip_permutation a list of ints") from None
  if min_kp < 0:
    raise ConfigError(f"config.data.min_keypoints_per_image must be >= 0, got {min_kp}")
  for key in ("image_dtype", "mask_dtype"):
    if data.get(key, "float32") not in ("float32", "uint8"):
      raise ConfigError(f"config.data.{key} must be 'float32' or 'uint8', got "
                        f"{data.get(key)!r}")
  if perm and sorted(perm) != list(range(len(perm))):
    raise ConfigError(f"config.data.keypoint_flip_permutation={perm} is not a permutation of "
                      f"range({len(perm)})")


def _prepare(data: Mapping[str, Any]):
  validate(data)
  dataset = data.get("dataset", "shapes")
  if dataset in SECTION_KEYS:
    return _ensure_synthetic(data, dataset)
  tfds_dir = os.path.expanduser(data.get("tfds_dir") or os.path.join("~", "tensorflow_datasets"))
  with _file_lock(os.path.join(tfds_dir, ".maskrcnn_jax_prepare.lock")):
    return prepare_coco_format(os.path.expanduser(data["root"]), tfds_dir,
                               annotations=data.get("annotations", "instances"),
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
      start_batch=int(start_batch),
      min_keypoints_per_image=int(data.get("min_keypoints_per_image", 0)),
      keypoint_flip_permutation=tuple(int(p) for p in
                                      data.get("keypoint_flip_permutation", ()) or ()) or None,
      image_dtype=str(data.get("image_dtype", "float32")),
      mask_dtype=str(data.get("mask_dtype", "float32")))


def _int_or_tuple(v):
  if isinstance(v, (list, tuple)):
    return tuple(int(x) for x in v)
  return int(v)
