"""Table 2c: the RoI layer pool (reduce max) for boxes and masks, R50-FPN (paper, R50-C4: 26.9)."""
from configs.ablations import common


def get_config():
  return common.roi_layer("pool", "max", "fpn")
