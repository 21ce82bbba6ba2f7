"""Table 2a: R101-FPN (paper 35.4)."""
from configs.ablations import common


def get_config():
  return common.fpn(101)
