"""Table 2c: the RoI layer warp (reduce ave) for boxes and masks, R50-FPN (paper, R50-C4: 27.1)."""
from configs.ablations import common


def get_config():
  return common.roi_layer("warp", "ave", "fpn")
