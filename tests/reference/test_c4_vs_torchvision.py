"""The paper's ResNet-C4 Mask R-CNN side by side with torchvision composed the same way
(`tv_models.construct_c4`: C4 backbone, one-level RPN and RoIAlign, `layer4` shared as the box
and mask head), random-init weights, one photo at a short side of 320 with 300 proposals, bucketed
padding (the general path: each image's extent inside a larger canvas). Asserted as in
test_family_vs_torchvision.py: >= 99% of torchvision's detections matched (same label, box IoU
>= 0.99, |score difference| <= 1e-3) and >= 99% of matched masks at binarized IoU >= 0.98.
"""
import pytest

import maskrcnn_jax
from maskrcnn_jax.convert.torchvision import variables_from_state_dict
from maskrcnn_jax.modeling.builder import build_model, torchvision_model_config
from tests.conftest import torch_or_skip
from tests.reference import tv_models

pytestmark = [pytest.mark.reference, pytest.mark.slow]

MIN_SIZE, MAX_SIZE, PROPOSALS = 320, 512, 300


def c4_model_config(proposals: int):
  """Our config of `tv_models.construct_c4` (91 classes)."""
  m = torchvision_model_config(50)
  m.backbone.type = "resnet_c4"
  m.rpn.update(dict(channels=1024, anchor_sizes=((32, 64, 128, 256, 512),),
                    pre_nms_topk_test=proposals, post_nms_topk_test=proposals))
  m.box_pooler.output_size = 14
  m.box_head.fc_layers = ()
  m.mask_head.update(dict(layers=(), deconv_channels=256))
  return m


def test_c4_detections_match_torchvision():
  torch, _ = torch_or_skip()
  image = tv_models.photos()["coffee"]
  tv = tv_models.build_torchvision(50, 3, image, kind="maskrcnn_c4", min_size=MIN_SIZE,
                                   max_size=MAX_SIZE, rpn_pre_nms_top_n_test=PROPOSALS,
                                   rpn_post_nms_top_n_test=PROPOSALS)
  model = build_model(c4_model_config(PROPOSALS))
  variables = variables_from_state_dict(model, tv_models.c4_state_dict(tv))
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in tv([tv_models.to_tensor(image)])[0].items()}
  ref["masks"] = ref["masks"][:, 0]
  assert len(ref["scores"]) >= 20, "the reference model must detect things"
  ours = maskrcnn_jax.predict(model, variables, [image], min_size=MIN_SIZE, max_size=MAX_SIZE)[0]
  stats = tv_models.match_detections(ref, ours)
  print(f"R50-C4 coffee bucketed: {stats}")
  assert stats["rate"] >= 0.99, stats
  assert stats["mask_ok_rate"] >= 0.99, stats
