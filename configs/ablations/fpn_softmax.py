"""Table 2b: per-pixel softmax over classes instead of per-class sigmoids, R50-FPN (paper, on
R50-C4: 24.8)."""
from configs.ablations import common


def get_config():
  c = common.fpn(50)
  c.model.mask_head.loss = "softmax"
  return c
