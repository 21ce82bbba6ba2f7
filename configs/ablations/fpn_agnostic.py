"""Table 2b (text): class-agnostic masks, R50-FPN (paper, R50-C4: 29.7 vs 30.3
class-specific)."""
from configs.ablations import common


def get_config():
  c = common.fpn(50)
  c.model.mask_head.class_agnostic = True
  return c
