"""Input pipeline throughput (images/s) on synthetic shapes data, training transforms, 1024 x 1024.

    python benchmarks/bench_pipeline.py [--num_images 256] [--source_size 640] [--batch_size 8]

Writes a shapes dataset to a temporary folder (or --work_dir), prepares it with the tfds builder,
then times `make_dataset(..., training=True)` with the default training chain: decode image and RLE
masks, crop masks to their boxes (112 x 112), random flip, resize to fit 1024 x 1024 with scale
jitter (0.8-1.25) and random crop, normalize, pad image and instances (100). Only the iteration is
timed (after warm-up), not the dataset preparation. It prints images/s (wall clock) and the CPU
time per image, which does not depend on other processes sharing the cores. On the 2-core CPU
machine a training step needs far less than this (one step of torchvision Mask R-CNN at batch 2,
512 x 512 takes ~12 s there: ~0.16 images/s).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--num_images", type=int, default=256)
  p.add_argument("--source_size", type=int, default=640,
                 help="side of the generated shapes images (COCO images are ~640 x 480)")
  p.add_argument("--output_size", type=int, default=1024)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--num_batches", type=int, default=40, help="timed batches")
  p.add_argument("--warmup_batches", type=int, default=5)
  p.add_argument("--max_objects", type=int, default=6)
  p.add_argument("--work_dir", default=None, help="keep data here (default: a temporary folder)")
  args = p.parse_args(argv)

  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")
  tfds.display_progress_bar(False)
  from maskrcnn_jax.data import make_dataset, prepare_coco_format, shapes

  work = args.work_dir or tempfile.mkdtemp(prefix="bench_pipeline_")
  try:
    run(args, work, make_dataset, prepare_coco_format, shapes)
  finally:
    if not args.work_dir:
      shutil.rmtree(work, ignore_errors=True)


def run(args, work, make_dataset, prepare_coco_format, shapes):
  src = os.path.join(work, f"shapes_{args.source_size}_{args.num_images}_{args.max_objects}")
  if not os.path.exists(os.path.join(src, "annotations", "instances_train.json")):
    t0 = time.perf_counter()
    shapes.generate_shapes(src, args.num_images, 0, seed=0, image_size=args.source_size,
                           max_objects=args.max_objects)
    print(f"generated {args.num_images} shapes images in {time.perf_counter() - t0:.1f} s")
  t0 = time.perf_counter()
  builder = prepare_coco_format(src, os.path.join(work, "tfds"))
  print(f"prepared the tfds dataset in {time.perf_counter() - t0:.1f} s")

  it = make_dataset(builder, "train", batch_size=args.batch_size, training=True, seed=0,
                    image_size=(args.output_size, args.output_size), max_instances=100,
                    mask_crop_size=112, scale_range=(0.8, 1.25))
  for _ in range(args.warmup_batches):
    batch = next(it)
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(args.num_batches):
    batch = next(it)
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  n = args.num_batches * args.batch_size
  shapes_str = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items()
                         if k in ("image", "gt_masks", "gt_boxes"))
  print(f"batch: {shapes_str}")
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"pipeline throughput: {n / dt:.1f} images/s ({dt / args.num_batches:.3f} s per batch of "
        f"{args.batch_size}; {os.cpu_count()} CPU cores; source {args.source_size}x"
        f"{args.source_size} PNG -> {args.output_size}x{args.output_size})")
  # Wall-clock throughput drops when other processes share the cores; CPU time per image does not.
  print(f"CPU time: {1000 * cpu / n:.1f} ms per image -> {n / cpu:.1f} images/s per fully "
        f"available core (load average during the run: {load:.1f})")


if __name__ == "__main__":
  main()
