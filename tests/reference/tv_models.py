"""Random-init torchvision Faster/Mask R-CNNs (v1, v2) that behave like detectors, for side-by-side
tests.

torchvision's own random init gives near-constant class scores (no detection passes 0.05), so after
seeding we randomize every BatchNorm's statistics and affine terms, widen the heads a little, and
take the proposal-mean direction out of the classifier, which gives ~100 detections over a dozen
classes with distinct scores: a real test of per-class decoding, NMS and masks.
"""
import numpy as np


def photos():
  """Real photos of three shapes (square, landscape, landscape of odd size)."""
  import skimage.data
  return {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
          "chelsea": skimage.data.chelsea()}


def to_tensor(image: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


MODELS = {  # name -> (mask head, version)
    "maskrcnn": (True, 1), "fasterrcnn": (False, 1),
    "maskrcnn_v2": (True, 2), "fasterrcnn_v2": (False, 2),
    "keypointrcnn": (False, 1),  # 2 classes (person), 17 keypoints
}


def _construct(kind: str, depth: int, **kwargs):
  """torchvision's `{kind}_resnet50_fpn[_v2]` with weights=None (BatchNorm2d backbone), or for
  another depth the same composition on that ResNet (v1: `resnet_fpn_backbone`, FrozenBatchNorm2d
  form; v2: BatchNorm2d everywhere, two-conv RPN head, 4conv1fc box head, BN mask head)."""
  import torch.nn as nn
  import torchvision
  from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
  from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
  from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
  from torchvision.models.detection.rpn import RPNHead
  mask, version = MODELS[kind]
  if depth == 50:
    ctor = getattr(torchvision.models.detection,
                   f"{kind.split('_')[0]}_resnet50_fpn" + ("_v2" if version == 2 else ""))
    return ctor(weights=None, weights_backbone=None, **kwargs)
  cls = MaskRCNN if mask else FasterRCNN
  if version == 1:
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None,
                                   trainable_layers=5)
    if kind == "keypointrcnn":
      return KeypointRCNN(backbone, num_classes=2, **kwargs)
    return cls(backbone, num_classes=91, **kwargs)
  body = getattr(torchvision.models, f"resnet{depth}")(weights=None)
  backbone = _resnet_fpn_extractor(body, 5, norm_layer=nn.BatchNorm2d)
  heads = dict(rpn_head=RPNHead(256, 3, conv_depth=2),
               box_head=FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024],
                                           norm_layer=nn.BatchNorm2d))
  if mask:
    heads["mask_head"] = MaskRCNNHeads(256, [256] * 4, 1, norm_layer=nn.BatchNorm2d)
  return cls(backbone, num_classes=91, **heads, **kwargs)


def construct_c4(depth: int = 50, mask: bool = True, **kwargs):
  """A torchvision Faster/Mask R-CNN composed as the paper's ResNet-C4 (Detectron2's
  `Res5ROIHeads`): a FrozenBatchNorm2d ResNet to layer3 (C4, stride 16) as the backbone, the RPN on
  C4 with anchors 32..512 on its one level, one-level RoIAlign (14 x 14, sampling 2) for boxes and
  masks, and the ResNet's `layer4` (one module, shared) as the box head (then average-pooled) and
  the mask head; predictors FastRCNNPredictor(2048) and MaskRCNNPredictor(2048, 256)."""
  import torch.nn as nn
  import torchvision
  from torchvision.models._utils import IntermediateLayerGetter
  from torchvision.models.detection import FasterRCNN, MaskRCNN
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
  from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
  from torchvision.models.detection.rpn import RPNHead
  from torchvision.ops import MultiScaleRoIAlign
  from torchvision.ops.misc import FrozenBatchNorm2d
  body = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
  res5 = body.layer4
  backbone = IntermediateLayerGetter(body, {"layer3": "0"})
  backbone.out_channels = 1024
  heads = dict(
      rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
      rpn_head=RPNHead(1024, 15),
      box_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
      box_head=nn.Sequential(res5, nn.AdaptiveAvgPool2d(1)),
      box_predictor=FastRCNNPredictor(2048, 91))
  if mask:
    heads.update(mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), mask_head=res5,
                 mask_predictor=MaskRCNNPredictor(2048, 256, 91))
  return (MaskRCNN if mask else FasterRCNN)(backbone, num_classes=None, **heads, **kwargs)


def c4_state_dict(model) -> dict:
  """`construct_c4`'s state_dict under the names `convert` gives a C4 model: the backbone's
  'backbone.*' as 'backbone.body.*', the shared layer4 ('roi_heads.box_head.0.*', repeated under
  'roi_heads.mask_head.*') as 'backbone.body.layer4.*'."""
  out = {}
  for k, v in model.state_dict().items():
    if k.startswith("roi_heads.mask_head."):
      continue  # the same module as box_head.0
    if k.startswith("roi_heads.box_head.0."):
      k = "backbone.body.layer4." + k[len("roi_heads.box_head.0."):]
    elif k.startswith("backbone."):
      k = "backbone.body." + k[len("backbone."):]
    out[k] = v
  return out


def build_torchvision(depth: int = 50, seed: int = 0, calibration_image=None,
                      kind: str = "maskrcnn", **kwargs):
  """A torchvision detector (`kind` in MODELS, ResNet-`depth` FPN; or 'maskrcnn_c4' /
  'fasterrcnn_c4': `construct_c4`) with detector-like random weights, in eval mode. kwargs go to
  the model's constructor (e.g. min_size, proposal counts)."""
  import torch
  import torchvision

  torch.manual_seed(seed)
  if kind.endswith("_c4"):
    m = construct_c4(depth, kind.startswith("mask"), **kwargs)
  else:
    m = _construct(kind, depth, **kwargs)
  m.eval()
  g = torch.Generator().manual_seed(seed + 1)
  norms = (torch.nn.BatchNorm2d, torchvision.ops.misc.FrozenBatchNorm2d)
  with torch.no_grad():
    for name, mod in m.named_modules():
      if isinstance(mod, norms):
        c = mod.weight.shape[0]
        last = name.endswith("bn3") or name.endswith("downsample.1")
        mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        mod.weight.copy_(torch.rand(c, generator=g) * 0.5 + (0.25 if last else 0.75))
        mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
    # Scale the heads to detector-like output ranges measured on a calibration photo: objectness
    # logits with std 2 (no sigmoid saturation, so no score ties), box deltas with std 0.5, class
    # logits with std 2.5 after removing the direction shared by all proposals.
    image = calibration_image if calibration_image is not None else photos()["astronaut"]
    il, _ = m.transform([to_tensor(image)])
    feats = m.backbone(il.tensors)
    obj, _ = m.rpn.head(list(feats.values()))
    obj_std = torch.cat([o.flatten() for o in obj]).std()
    m.rpn.head.cls_logits.weight.div_(obj_std / 2.0)
    m.rpn.head.cls_logits.bias.zero_()
    props, _ = m.rpn(il, feats)
    for layer in m.roi_heads.box_head.modules():
      if isinstance(layer, torch.nn.Linear):
        layer.weight.mul_(3)
    box_feats = m.roi_heads.box_head(m.roi_heads.box_roi_pool(feats, props, il.image_sizes))
    box_feats = box_feats.flatten(1)  # C4: [N, 2048, 1, 1]
    reg = m.roi_heads.box_predictor.bbox_pred
    reg.weight.div_(reg(box_feats).std() / 0.5)
    mu = box_feats.mean(0)
    w = m.roi_heads.box_predictor.cls_score.weight
    w -= (w @ mu)[:, None] * mu[None] / (mu @ mu)
    w.div_(m.roi_heads.box_predictor.cls_score(box_feats).std() / 2.5)
  return m


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pairwise IoU in float64 numpy (the independent reference). a: [N, 4], b: [M, 4] -> [N, M]."""
  a = a.astype(np.float64)
  b = b.astype(np.float64)
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_detections(ref: dict, ours: dict, iou_min=0.99, score_tol=1e-3, mask_iou_min=0.98):
  """Matches each reference detection to an unused one of ours with the same label, box IoU >=
  iou_min and |score difference| <= score_tol (greedy, best IoU first).

  Returns dict(n_ref, n_ours, matched, rate, min_mask_iou, mask_ok_rate, max_score_diff,
    min_box_iou, and with keypoints on both sides: n_keypoints (of matched detections),
    keypoints_ok_rate (within 1 pixel), max_keypoint_dist, max_keypoint_score_diff (over the
    points within 1 pixel)).
  """
  n_ref, n_ours = len(ref["scores"]), len(ours["scores"])
  stats = dict(n_ref=n_ref, n_ours=n_ours, matched=0, rate=1.0 if n_ref == 0 else 0.0,
               min_mask_iou=1.0, mask_ok_rate=1.0, max_score_diff=0.0, min_box_iou=1.0)
  if n_ref == 0:
    return stats
  iou = box_iou(ref["boxes"], ours["boxes"]) if n_ours else np.zeros((n_ref, 0))
  used = np.zeros(n_ours, bool)
  pairs = []
  for i in range(n_ref):
    ok = ((iou[i] >= iou_min) & (ours["labels"] == ref["labels"][i])
          & (np.abs(ours["scores"] - ref["scores"][i]) <= score_tol) & ~used)
    if ok.any():
      j = int(np.argmax(np.where(ok, iou[i], -1)))
      used[j] = True
      pairs.append((i, j))
  stats["matched"] = len(pairs)
  stats["rate"] = len(pairs) / n_ref
  if pairs:
    stats["max_score_diff"] = float(max(abs(ref["scores"][i] - ours["scores"][j])
                                        for i, j in pairs))
    stats["min_box_iou"] = float(min(iou[i, j] for i, j in pairs))
    if "masks" in ref and "masks" in ours:
      mious = []
      for i, j in pairs:
        a, b = ref["masks"][i] > 0.5, ours["masks"][j] > 0.5
        union = np.logical_or(a, b).sum()
        mious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
      mious = np.asarray(mious)
      stats["min_mask_iou"] = float(mious.min())
      stats["mask_ok_rate"] = float((mious >= mask_iou_min).mean())
    if "keypoints" in ref and "keypoints" in ours:
      i, j = np.asarray(pairs).T
      a, b = ref["keypoints"][i].astype(np.float64), ours["keypoints"][j].astype(np.float64)
      dist = np.hypot(a[..., 0] - b[..., 0], a[..., 1] - b[..., 1])
      ok = dist <= 1.0
      sdiff = np.abs(ref["keypoints_scores"][i] - ours["keypoints_scores"][j])
      stats.update(n_keypoints=int(dist.size), keypoints_ok_rate=float(ok.mean()),
                   max_keypoint_dist=float(dist.max()),
                   max_keypoint_score_diff=float(sdiff[ok].max()) if ok.any() else 0.0)
  return stats
