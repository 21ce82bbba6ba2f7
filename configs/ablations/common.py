"""The ablation configs' common ground: the demo's model and recipe (configs/shapes.py) at half its
steps, on the harder shapes (objects may be 90% hidden, `min_visible_fraction=0.1`), so that the
paper's Table 2 can be trained row by row on 2 CPU cores (`python -m
maskrcnn_jax.experiments.ablate`; times per run in benchmarks/RESULTS.md).

`fpn()` is the demo's ResNet-FPN; `c4()` the paper's ResNet-C4 at the same width (Detectron2's
`Res5ROIHeads`: RoIs pooled 14 x 14 from C4, the res5 stage as the shared head, average-pooled for
the box predictor, one deconvolution to 14 x 14 masks). "R50" / "R101" here are the demo's
one-block-per-stage ResNet and the same with four blocks in the third stage (where R101 differs
from R50), not the full-size networks.

The C4 model trained ~13x slower than the FPN one on 2 CPU cores (0.25 vs 3.3 steps/s at
5f8db58: the res5 head runs on every sampled RoI), so Tables 2b and 2c also have FPN forms
(`fpn_*` rows, the runner's tables "2b" and "2c"); their C4 forms, the paper's, are the tables
"2b-c4" and "2c-c4".
"""
from configs import shapes

STEPS = 1500  # half the demo's


def fpn(depth: int = 50):
  c = shapes.get_config()
  c.data.shapes.min_visible_fraction = 0.1
  t = c.training
  t.steps = STEPS
  t.eval_every = 0  # eval.py evaluates the final weights
  t.checkpoint_every = 250
  if depth == 101:
    c.model.backbone.update(dict(depth=101, stage_blocks=(1, 1, 4, 1)))
  elif depth != 50:
    raise ValueError(f"depth must be 50 or 101, got {depth}")
  return c


def c4(depth: int = 50):
  c = fpn(depth)
  m = c.model
  m.backbone.type = "resnet_c4"
  m.box_pooler.output_size = 14
  m.box_head.fc_layers = ()  # the predictor reads the averaged res5 features
  m.mask_head.layers = ()
  m.mask_head.deconv_channels = 64
  return c


def roi_layer(type_: str, reduce: str, backbone: str = "c4"):
  """Table 2c: R50-C4 (`backbone="c4"`, the paper's) or R50-FPN (`"fpn"`) with the RoI layer
  `type_` ('align', 'pool', 'warp') reducing bins by `reduce` ('ave', 'max') for boxes and masks."""
  c = {"c4": c4, "fpn": fpn}[backbone](50)
  for pooler in (c.model.box_pooler, c.model.mask_pooler):
    pooler.type = type_
    pooler.reduce = reduce
  return c
