"""Table 2c: RoIAlign reducing bins by max for boxes and masks, R50-FPN (paper, R50-C4: 30.2)."""
from configs.ablations import common


def get_config():
  return common.roi_layer("align", "max", "fpn")
