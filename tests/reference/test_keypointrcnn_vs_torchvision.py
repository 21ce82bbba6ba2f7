"""torchvision's `keypointrcnn_resnet50_fpn` side by side with the model `from_torchvision(sd)`
builds from its state_dict alone.

Random-init weights with BatchNorm statistics randomized (`tv_models.build_torchvision`), a real
photo of a person (skimage's astronaut), torchvision one image per call, at a short side of 320
(long side <= 512) with 300 proposals and 50 detections (the keypoint head, eight 512-wide
convs per detection, is most of the time on both sides); full size (800 px, 1000 proposals) is
`benchmarks/bench_family.py`'s. Asserted in exact and bucketed padding: >= 99% of torchvision's
detections matched (same label, box IoU >= 0.99, |score difference| <= 1e-3) and >= 99% of the
matched detections' keypoints within 1 pixel. Printed with -s.
"""
import numpy as np
import pytest

import maskrcnn_jax
from maskrcnn_jax.convert import from_torchvision
from maskrcnn_jax.convert.torchvision import describe_state_dict
from tests.conftest import torch_or_skip
from tests.reference import tv_models
from tests.reference.test_family_vs_torchvision import with_proposals

pytestmark = [pytest.mark.reference]

MIN_SIZE, MAX_SIZE, PROPOSALS, DETECTIONS = 320, 512, 300, 50


@pytest.mark.slow
def test_keypoints_match_torchvision():
  torch, _ = torch_or_skip()
  image = tv_models.photos()["astronaut"]
  tv = tv_models.build_torchvision(50, 0, image, kind="keypointrcnn", min_size=MIN_SIZE,
                                   max_size=MAX_SIZE, rpn_pre_nms_top_n_test=PROPOSALS,
                                   rpn_post_nms_top_n_test=PROPOSALS,
                                   box_detections_per_img=DETECTIONS)
  model, variables = from_torchvision(tv.state_dict())
  assert model.head_names == ("keypoint_head",)
  assert model.num_classes == 2 and model.head("keypoint_head").num_keypoints == 17
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in tv([tv_models.to_tensor(image)])[0].items()}
  assert len(ref["scores"]) == DETECTIONS, "the reference model must detect things"
  model = with_proposals(model, PROPOSALS)
  model = model.clone(postprocess=model.postprocess.clone(detections_per_image=DETECTIONS))
  for exact in (True, False):
    ours = maskrcnn_jax.predict(model, variables, [image], exact_padding=exact,
                                min_size=MIN_SIZE, max_size=MAX_SIZE)[0]
    assert ours["keypoints"].shape == (len(ours["scores"]), 17, 3)
    assert ours["keypoints_scores"].shape == (len(ours["scores"]), 17)
    stats = tv_models.match_detections(ref, ours)
    print(f"keypointrcnn R50 astronaut {'exact' if exact else 'bucketed'}: {stats}")
    assert stats["rate"] >= 0.99, stats
    assert stats["keypoints_ok_rate"] >= 0.99, stats
    assert stats["max_keypoint_score_diff"] <= 1e-3, stats


def test_r101_keypointrcnn_state_dict_converts():
  """torchvision's Keypoint R-CNN on a ResNet-101 FPN (and a head of other widths): recognized
  from the keys and shapes, every variable loaded."""
  torch, _ = torch_or_skip()
  from torchvision.models.detection import KeypointRCNN
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
  from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
  torch.manual_seed(0)
  backbone = resnet_fpn_backbone(backbone_name="resnet101", weights=None, trainable_layers=5)
  tv = KeypointRCNN(backbone, num_classes=2, keypoint_head=KeypointRCNNHeads(256, (128, 64)),
                    keypoint_predictor=KeypointRCNNPredictor(64, 5))
  sd = tv.state_dict()
  found = describe_state_dict(sd)
  assert (found["depth"], found["keypoints"], found["keypoint_layers"]) == (101, 5, (128, 64))
  model, variables = from_torchvision(sd)
  head = model.head("keypoint_head")
  assert (head.num_keypoints, tuple(head.conv_layers)) == (5, (128, 64))
  w = sd["roi_heads.keypoint_predictor.kps_score_lowres.weight"].numpy()
  ours = np.asarray(variables["params"]["keypoint_head"]["kps_score_lowres"]["kernel"])
  np.testing.assert_array_equal(ours, w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
