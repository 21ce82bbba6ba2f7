"""Base config: torchvision's `maskrcnn_resnet50_fpn` (v1) defaults. Variants override a few fields.

`training`, `data` and `init` follow torchvision's detection reference recipe (8 GPUs x 2 images,
lr 0.02, 26 epochs with decays after epochs 16 and 22, ImageNet-initialized backbone with the stem
and layer1 frozen) on COCO 2017 at torchvision's input size.
"""
import ml_collections

from maskrcnn_jax.modeling.builder import torchvision_input_config, torchvision_model_config


def training_config() -> ml_collections.ConfigDict:
  """`config.training`: the optimizer, schedule, loop and parallelism (see
  maskrcnn_jax/training/optimizer.py and trainer.py)."""
  t = ml_collections.ConfigDict()
  t.steps = 190_000              # 26 epochs of COCO train2017 (117k images) at batch 16
  t.batch_size = 16              # global: split over all devices of all processes
  t.learning_rate = 0.02
  t.momentum = 0.9
  t.weight_decay = 1e-4
  t.weight_decay_norm_and_bias = False
  t.schedule = "step"            # 'step' (decay_factor at each of decay_steps) or 'cosine'
  t.decay_steps = (117_000, 161_000)
  t.decay_factor = 0.1
  t.min_lr_factor = 0.0          # 'cosine': final lr / learning_rate
  t.warmup_steps = 1000          # linear from learning_rate * warmup_factor
  t.warmup_factor = 0.001
  t.clip_grad_norm = 0.0         # global-norm clipping of the gradients; 0 = off
  t.frozen_stages = 1            # 0 none; k: stem + layer1..layer{k} (1 = torchvision's default)
  t.seed = 0                     # parameter init and RoI/anchor sampling
  t.log_every = 20
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.eval_every = 0               # steps between evaluate(...) callbacks; 0 = never
  t.async_checkpointing = True
  t.compilation_cache_dir = ""   # a jax persistent compilation cache folder; "" = none
  t.distributed = ml_collections.ConfigDict(dict(
      enabled=False,             # call jax.distributed.initialize (multi-host)
      coordinator_address="",    # 'host:port' of process 0; else $JAX_COORDINATOR_ADDRESS
      num_processes=-1,          # else $JAX_NUM_PROCESSES (or jax's cluster auto-detection)
      process_id=-1,             # else $JAX_PROCESS_ID
      local_device_ids=(),
      cpu_collectives="gloo"))
  return t


def data_config() -> ml_collections.ConfigDict:
  """`config.data`: which dataset and how batches are made (maskrcnn_jax/training/data_source.py,
  maskrcnn_jax/data/pipeline.py)."""
  d = ml_collections.ConfigDict()
  d.dataset = "coco_format"      # 'coco_format' (a COCO-format folder), 'shapes' (synthetic) or
                                 # 'keypoint_shapes' (synthetic stick figures with keypoints)
  d.root = ""                    # coco_format: the folder, e.g. /data/coco (COCO 2017 layout)
  d.annotations = "instances"    # coco_format: which JSONs, 'instances' or 'person_keypoints'
                                 # (annotations/person_keypoints_{train,val}2017.json)
  d.tfds_dir = ""                # coco_format: where it is prepared; "" = ~/tensorflow_datasets
  d.prepare_workers = 1          # processes preparing the tfds dataset (first use only)
  d.cache_dir = ""               # shapes / keypoint_shapes: "" = ~/.cache/maskrcnn_jax/<dataset>-
                                 # <hash of its parameters below>
  d.shapes = ml_collections.ConfigDict(dict(num_train=1000, num_val=100, seed=0, image_size=128,
                                            min_objects=1, max_objects=6,
                                            min_visible_fraction=0.5))
  d.keypoint_shapes = ml_collections.ConfigDict(dict(num_train=1000, num_val=100, seed=0,
                                                     image_size=128, min_figures=1, max_figures=4,
                                                     min_visible_fraction=0.5, max_overlap=0.3))
  d.train_split = "train"
  d.eval_split = "validation"
  d.image_size = (1344, 1344)    # padded (height, width), multiples of 32
  d.resize = "short_side"        # 'short_side' (torchvision) or 'fit' (TPU style)
  d.min_size = 800               # short_side: short side (an int or a tuple to draw from)
  d.max_size = 1333              # short_side: long side at most
  d.scale_range = (1.0, 1.0)     # fit: random scale jitter in training, e.g. (0.8, 1.25)
  d.flip_prob = 0.5
  d.max_instances = 100
  d.max_crowd_instances = 20
  d.mask_crop_size = 112
  d.image_dtype = "float32"      # 'uint8': images sent rounded, normalized on the device (4x less)
  d.mask_dtype = "float32"       # 'uint8': mask crops binarized at 0.5 (4x fewer bytes)
  d.min_keypoints_per_image = 0  # keypoints: training skips images with fewer labelled keypoints
                                 # (0 = off; torchvision's COCO keypoint reference uses 10)
  d.keypoint_flip_permutation = ()  # keypoints: which point a flip swaps with which; () = from
                                    # the names (left_<s> <-> right_<s>)
  d.shuffle_buffer = 1024
  d.seed = 0                     # file order, shuffling, augmentation
  return d


def init_config() -> ml_collections.ConfigDict:
  """`config.init`: weights to start from (both empty: random initialization)."""
  i = ml_collections.ConfigDict()
  i.torchvision_checkpoint = ""  # a torchvision Mask R-CNN state_dict (.pth); shapes that differ
                                 # (e.g. other num_classes) are re-initialized and reported
  i.imagenet_resnet = ""         # a torchvision ImageNet ResNet state_dict (.pth) for the backbone
  return i


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = torchvision_model_config(depth=50)
  c.input = torchvision_input_config()
  c.training = training_config()
  c.data = data_config()
  c.init = init_config()
  return c
