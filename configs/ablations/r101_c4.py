"""Table 2a: R101-C4 (paper 32.7)."""
from configs.ablations import common


def get_config():
  return common.c4(101)
