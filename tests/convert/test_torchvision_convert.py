"""from_torchvision: key mapping, both BatchNorm forms, .pth loading, clear errors."""
import numpy as np
import pytest

from maskrcnn_jax.convert import from_torchvision
from tests.conftest import torch_or_skip

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def state_dict():
  torch, torchvision = torch_or_skip()
  torch.manual_seed(0)
  m = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
  return {k: v.numpy() for k, v in m.state_dict().items()}


def test_every_weight_lands_once(state_dict):
  model, variables = from_torchvision(state_dict)
  p = variables["params"]
  np.testing.assert_array_equal(np.asarray(p["backbone"]["conv1"]["kernel"]),
                                state_dict["backbone.body.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(p["box_head"]["cls_score"]["kernel"]),
                                state_dict["roi_heads.box_predictor.cls_score.weight"].T)
  # fc6: torch flattens (c, h, w), ours (h, w, c).
  fc6 = state_dict["roi_heads.box_head.fc6.weight"].reshape(1024, 256, 7, 7)
  np.testing.assert_array_equal(np.asarray(p["box_head"]["fc6"]["kernel"]).reshape(7, 7, 256, 1024),
                                fc6.transpose(2, 3, 1, 0))
  bs = variables["batch_stats"]["backbone"]["layer2_0"]["downsample_bn"]
  np.testing.assert_array_equal(np.asarray(bs["running_var"]),
                                state_dict["backbone.body.layer2.0.downsample.1.running_var"])
  n_ours = sum(x.size for x in __import__("jax").tree.leaves(variables))
  n_ref = sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
  assert n_ours == n_ref


def test_frozen_bn_form_and_pth_path(state_dict, tmp_path):
  torch, _ = torch_or_skip()
  frozen = {k: torch.from_numpy(v) for k, v in state_dict.items()
            if not k.endswith("num_batches_tracked")}
  path = tmp_path / "weights.pth"
  torch.save(frozen, path)
  _, variables = from_torchvision(str(path))
  np.testing.assert_array_equal(np.asarray(variables["params"]["rpn"]["head"]["conv"]["bias"]),
                                state_dict["rpn.head.conv.0.0.bias"])


def test_missing_unexpected_and_misshaped_keys_are_named(state_dict):
  bad = dict(state_dict)
  del bad["roi_heads.mask_predictor.conv5_mask.bias"]
  bad["roi_heads.box_head.fc7.weight"] = np.zeros((1024, 1000), np.float32)
  bad["roi_heads.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as err:
    from_torchvision(bad)
  msg = str(err.value)
  assert "missing keys (1): roi_heads.mask_predictor.conv5_mask.bias" in msg
  assert "unexpected keys (1): roi_heads.extra.weight" in msg
  assert "mis-shaped keys (1): roi_heads.box_head.fc7.weight" in msg


def test_wrong_num_classes_or_backbone(state_dict):
  with pytest.raises(ValueError, match="cls_score"):
    from_torchvision(state_dict, num_classes=4)
  with pytest.raises(ValueError, match="backbone"):
    from_torchvision(state_dict, backbone="resnet34")
  with pytest.raises(ValueError, match="ResNet-50"):
    from_torchvision(state_dict, backbone="resnet101")
  with pytest.raises(TypeError, match="state_dict"):
    from_torchvision([1, 2, 3])
