"""Table 2b: per-pixel softmax over classes instead of per-class sigmoids, R50-C4 (paper 24.8)."""
from configs.ablations import common


def get_config():
  c = common.c4(50)
  c.model.mask_head.loss = "softmax"
  return c
