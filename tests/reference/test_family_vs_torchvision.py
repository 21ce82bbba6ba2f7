"""torchvision's detection family side by side: Mask R-CNN and Faster R-CNN, v1 and v2, on ResNet-50
and ResNet-101 FPN backbones, converted by `from_torchvision(state_dict)` alone.

Random-init weights with BatchNorm statistics randomized (`tv_models.build_torchvision`), one real
photo per model, torchvision one image per call. In the suite both sides run at a short side of 320
(long side <= 512) with 300 proposals, on four of the eight models, so that every kind (Mask and
Faster R-CNN, v1 and v2) and both depths are seen in two minutes; all eight at full size (800 px,
1000 proposals, three photos each) are `benchmarks/bench_family.py`'s (measured in
benchmarks/RESULTS.md; at 320 px all eight matched 100/100 when the suite still ran them).
Printed with -s. Asserted in exact and bucketed padding: >= 99% of torchvision's detections
matched (same label, box IoU >= 0.99, |score difference| <= 1e-3) and >= 99% of matched masks at
binarized IoU >= 0.98.
"""
import pytest

import maskrcnn_jax
from maskrcnn_jax.convert import from_torchvision
from tests.conftest import torch_or_skip
from tests.reference import tv_models

pytestmark = [pytest.mark.reference, pytest.mark.slow]

MIN_SIZE, MAX_SIZE, PROPOSALS = 320, 512, 300
CASES = [  # (torchvision model, ResNet depth, photo, seed)
    ("maskrcnn", 50, "coffee", 0),
    ("fasterrcnn_v2", 50, "chelsea", 11),
    ("fasterrcnn", 101, "chelsea", 13),
    ("maskrcnn_v2", 101, "coffee", 15),
]


def with_proposals(model, n):
  """The model with `n` proposals before and after the RPN's NMS at inference."""
  return model.clone(rpn=model.rpn.clone(pre_nms_topk_test=n, post_nms_topk_test=n))


@pytest.mark.parametrize("kind,depth,photo,seed", CASES,
                         ids=[f"{k}-r{d}-{p}" for k, d, p, _ in CASES])
def test_detections_match_torchvision(kind, depth, photo, seed):
  torch, _ = torch_or_skip()
  image = tv_models.photos()[photo]
  tv = tv_models.build_torchvision(depth, seed, image, kind=kind, min_size=MIN_SIZE,
                                   max_size=MAX_SIZE, rpn_pre_nms_top_n_test=PROPOSALS,
                                   rpn_post_nms_top_n_test=PROPOSALS)
  model, variables = from_torchvision(tv.state_dict())
  mask, version = tv_models.MODELS[kind]
  # What from_torchvision worked out from the keys and shapes alone.
  assert model.head_names == (("mask_head",) if mask else ())
  assert model.backbone.norm == ("bn" if version == 2 else "frozen_bn")
  assert len(model.box_head.conv_layers) == (4 if version == 2 else 0)
  assert model.num_classes == 91
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in tv([tv_models.to_tensor(image)])[0].items()}
  if mask:
    ref["masks"] = ref["masks"][:, 0]
  assert len(ref["scores"]) >= 20, "the reference model must detect things"
  model = with_proposals(model, PROPOSALS)
  for exact in (True, False):
    ours = maskrcnn_jax.predict(model, variables, [image], exact_padding=exact,
                                min_size=MIN_SIZE, max_size=MAX_SIZE)[0]
    assert ("masks" in ours) == mask
    stats = tv_models.match_detections(ref, ours)
    print(f"{kind} R{depth} {photo} {'exact' if exact else 'bucketed'}: {stats}")
    assert stats["rate"] >= 0.99, stats
    if mask:
      assert stats["mask_ok_rate"] >= 0.99, stats
