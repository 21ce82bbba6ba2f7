"""Loss and AP curves of a training run from its TensorBoard events:
`python -m maskrcnn_jax.evaluation.curves WORKDIR` writes WORKDIR/curves.png."""
import glob
import os
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

from maskrcnn_jax.evaluation.visualize import plot_curves


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
  """{tag: [(step, value), ...] by step} from the event files under `logdir` (TF's reader, no
  TensorBoard). A step written more than once (an eval.py run after training evaluated the same
  step, a resumed run) keeps the value written last (event files are named by creation time)."""
  import tensorflow as tf
  from tensorflow.core.util import event_pb2
  out = defaultdict(dict)
  pattern = os.path.join(logdir, "**", "events.out.tfevents.*")
  for path in sorted(glob.glob(pattern, recursive=True)):
    for raw in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(raw.numpy())
      for v in event.summary.value:
        if v.HasField("tensor"):
          value = float(tf.make_ndarray(v.tensor))
        elif v.HasField("simple_value"):
          value = float(v.simple_value)
        else:
          continue
        out[v.tag][int(event.step)] = value
  return {k: sorted(v.items()) for k, v in out.items()}


def main(argv):
  if len(argv) != 2:
    print("usage: python -m maskrcnn_jax.evaluation.curves WORKDIR", file=sys.stderr)
    return 2
  workdir = argv[1]
  scalars = read_scalars(os.path.join(workdir, "tensorboard"))
  if not scalars:
    print(f"curves: no TensorBoard scalars under {workdir}/tensorboard", file=sys.stderr)
    return 1
  keep = {k.split("/", 1)[1] if k.startswith("train/") else k: v for k, v in scalars.items()
          if (k.startswith("train/loss")
              or k.startswith("eval/") and k.endswith(("/AP", "/AP50")))}
  path = os.path.join(workdir, "curves.png")
  plot_curves(keep, path, title=os.path.basename(os.path.normpath(workdir)))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
