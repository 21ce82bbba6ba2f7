"""Table 2b (text): class-agnostic masks, R50-C4 (paper 29.7 vs 30.3 class-specific)."""
from configs.ablations import common


def get_config():
  c = common.c4(50)
  c.model.mask_head.class_agnostic = True
  return c
