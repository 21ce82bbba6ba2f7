"""Table 2e: MLP mask head fc 1024 -> 1024 -> 1024 -> K x 28 x 28, R50-FPN (paper 31.5)."""
from configs.ablations import common


def get_config():
  c = common.fpn(50)
  c.model.mask_head.type = "mlp"
  c.model.mask_head.mlp_layers = (1024, 1024, 1024)
  return c
