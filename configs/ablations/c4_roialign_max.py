"""Table 2c: the RoI layer align (reduce max) for boxes and masks, R50-C4 (paper 30.2)."""
from configs.ablations import common


def get_config():
  return common.roi_layer("align", "max")
