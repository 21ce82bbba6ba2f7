"""Table 2a/2e/MS R-CNN baseline: R50-FPN with the FCN mask head (paper 33.6; MS R-CNN 34.2)."""
from configs.ablations import common


def get_config():
  return common.fpn(50)
