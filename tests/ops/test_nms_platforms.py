"""What `ops.nms` with its default method="auto" compiles to on each platform (lowered from this CPU
machine): greedy on CPU, tiled on TPU and GPU."""
import functools

import jax
import numpy as np

from maskrcnn_jax.ops.nms import nms
from tests.ops.test_nms import assert_same_keep, clustered_boxes, torch_nms


def _lowered_ops(fn, args, platform):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return {op: text.count(f"stablehlo.{op}") for op in ("scatter", "while", "sort")}


def test_auto_picks_greedy_on_cpu_and_tiled_on_accelerators():
  """"auto" lowered for cpu holds the greedy loop (its kept-index scatter); for tpu and cuda the
  tiled form: no scatter (the loops run over tiles and rounds)."""
  rng = np.random.default_rng(13)
  boxes, scores = clustered_boxes(rng, 1000), rng.random(1000).astype(np.float32)
  fn = functools.partial(nms, iou_threshold=0.5, max_output=300)
  cpu = _lowered_ops(fn, (boxes, scores), "cpu")
  assert cpu["scatter"] >= 1 and cpu["while"] >= 1
  for platform in ("tpu", "cuda"):
    ops = _lowered_ops(fn, (boxes, scores), platform)
    assert ops["scatter"] == 0 and ops["while"] >= 2, (platform, ops)
  # The same program runs on this CPU with the greedy answer.
  assert_same_keep(jax.jit(fn)(boxes, scores), torch_nms(boxes, scores, 0.5), 300)
