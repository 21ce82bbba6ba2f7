"""Table 2a/2b/2c baseline: R50-C4, RoIAlign (ave), per-class sigmoid masks (paper 30.3)."""
from configs.ablations import common


def get_config():
  return common.c4(50)
