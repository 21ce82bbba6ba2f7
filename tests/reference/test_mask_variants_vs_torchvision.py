"""Mask head variants side by side with torchvision.

1. Class-agnostic masks: a random-init torchvision Mask R-CNN whose mask predictor's K output
   channels are copies of one (so every class reads the same map) against our model with
   `mask_head.class_agnostic=True` holding that one channel: same detections, same RoI masks.
2. The MLP mask head and the softmax mask loss: torch modules of the same definitions placed in
   torchvision's `RoIHeads` (the MLP as its `mask_head`, an identity `mask_predictor`, the loss
   patched over the module-level `maskrcnn_loss`) and trained one forward on fixed features. The
   patched loss records the RoIs torchvision sampled, their classes and the targets it projected;
   our head reads the same RoIs from the same features: logits, loss and predicted masks agree.

Measured figures are printed (run with -s) and asserted.
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from maskrcnn_jax.convert import from_torchvision
from maskrcnn_jax.modeling.builder import build_model, torchvision_model_config
from maskrcnn_jax.modeling.losses import maskrcnn_softmax_loss
from maskrcnn_jax.modeling.roi_heads import HeadContext
from tests.conftest import torch_or_skip
from tests.reference import tv_models

pytestmark = pytest.mark.reference

MIN_SIZE, MAX_SIZE, PROPOSALS = 320, 512, 100


# ------------------------------------------------------------------------------------------------
# 1. Class-agnostic masks in the whole model


def _match(ref, ours, iou_min=0.99, score_tol=1e-3):
  """(i, j) pairs: each reference detection i and the unused one of ours with its label, the best
  box IoU >= iou_min and a score within score_tol."""
  iou = tv_models.box_iou(ref["boxes"], ours["boxes"])
  used = np.zeros(len(ours["boxes"]), bool)
  pairs = []
  for i in range(len(ref["boxes"])):
    ok = ((iou[i] >= iou_min) & (ours["labels"] == ref["labels"][i]) & ~used
          & (np.abs(ours["scores"] - ref["scores"][i]) <= score_tol))
    if ok.any():
      j = int(np.argmax(np.where(ok, iou[i], -1)))
      used[j] = True
      pairs.append((i, j))
  return pairs


@pytest.mark.slow  # ~35 s on 2 cores: the ResNet-50 model's compile is 16 s of it
def test_class_agnostic_masks_equal_torchvision_with_one_tiled_channel():
  torch, _ = torch_or_skip()
  image = tv_models.photos()["coffee"]
  tv = tv_models.build_torchvision(50, 20, image, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                   rpn_pre_nms_top_n_test=PROPOSALS,
                                   rpn_post_nms_top_n_test=PROPOSALS)
  predictor = tv.roi_heads.mask_predictor.mask_fcn_logits
  with torch.no_grad():  # every class' channel a copy of channel 0
    predictor.weight.copy_(predictor.weight[:1].expand_as(predictor.weight).clone())
    predictor.bias.copy_(predictor.bias[:1].expand_as(predictor.bias).clone())
  state = {k: v.numpy() for k, v in tv.state_dict().items()}
  for leaf in ("weight", "bias"):
    key = f"roi_heads.mask_predictor.mask_fcn_logits.{leaf}"
    state[key] = state[key][:1]  # the one channel our class-agnostic head holds
  config = torchvision_model_config(50, 91, version=1, mask=True)
  config.mask_head.class_agnostic = True
  config.rpn.pre_nms_topk_test = PROPOSALS
  config.rpn.post_nms_topk_test = PROPOSALS
  model, variables = from_torchvision(state, model_config=config)
  assert variables["params"]["mask_head"]["mask_fcn_logits"]["kernel"].shape == (1, 1, 256, 1)

  captured = {}
  hook = tv.roi_heads.register_forward_hook(
      lambda mod, args, out: captured.update({k: v.numpy() for k, v in out[0][0].items()}))
  with torch.no_grad():
    il, _ = tv.transform([tv_models.to_tensor(image)])
    tv([tv_models.to_tensor(image)])
  hook.remove()
  ref = dict(captured, masks=captured["masks"][:, 0])  # RoI masks [D, 28, 28], resized frame
  assert len(ref["scores"]) >= 20 and len(set(ref["labels"])) >= 5, "needs varied detections"

  x = jnp.asarray(il.tensors.permute(0, 2, 3, 1).numpy())
  sizes = jnp.asarray([list(il.image_sizes[0])], jnp.int32)
  padded = jnp.asarray([list(x.shape[1:3])], jnp.int32)
  out = jax.device_get(jax.jit(model.apply)(variables, x, sizes, padded))
  ours = {k: out[k][0][out["valid"][0]] for k in ("boxes", "scores", "labels", "masks")}
  pairs = _match(ref, ours)
  diff = max(np.abs(ref["masks"][i] - ours["masks"][j]).max() for i, j in pairs)
  print(f"class-agnostic: {len(pairs)}/{len(ref['scores'])} detections matched "
        f"({len(set(ref['labels']))} labels), max RoI mask probability difference {diff:.2e}")
  assert len(pairs) >= 0.99 * len(ref["scores"])
  assert diff <= 1e-4


# ------------------------------------------------------------------------------------------------
# 2. The MLP head and the softmax loss inside torchvision's RoIHeads


def _torch_mlp(torch, in_features, hidden, num_classes, side):
  """The fc mask head in torch: flatten [N, C, S, S] (c, h, w), hidden fcs + ReLU, an fc to
  K x side x side logits viewed as [N, K, side, side]."""
  nn = torch.nn

  class MaskMLP(nn.Module):
    def __init__(self):
      super().__init__()
      widths = [in_features] + list(hidden)
      self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
      self.logits = nn.Linear(widths[-1], num_classes * side * side)

    def forward(self, x):
      x = x.flatten(1)
      for fc in self.fcs:
        x = torch.relu(fc(x))
      return self.logits(x).view(-1, num_classes, side, side)
  return MaskMLP()


def _torch_softmax_loss(torch, record):
  """The softmax mask loss with `maskrcnn_loss`'s signature (targets projected as torchvision
  projects them), recording what it saw."""
  import torch.nn.functional as F
  from torchvision.models.detection.roi_heads import project_masks_on_boxes

  def loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs):
    side = mask_logits.shape[-1]
    labels = torch.cat([g[i] for g, i in zip(gt_labels, mask_matched_idxs)])
    targets = torch.cat([project_masks_on_boxes(m, p, i, side)
                         for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)])
    logp = F.log_softmax(mask_logits, dim=1)
    picked = logp[torch.arange(len(labels)), labels]
    value = -(targets * picked + (1 - targets) * logp[:, 0]).mean()
    record.update(logits=mask_logits.detach().numpy(), rois=torch.cat(proposals).numpy(),
                  labels=labels.numpy(), targets=targets.numpy(), loss=value.item())
    return value
  return loss


def _mlp_variables(mlp, pooled, channels, side):
  """The torch MLP's weights as our `mask_fc*` variables: kernels transposed; the first fc's
  inputs permuted from torch's (c, h, w) flattening to our (h, w, c), the last fc's outputs from
  (k, i, j) to (i, j, k)."""
  sd = {k: v.detach().numpy() for k, v in mlp.state_dict().items()}
  params = {}
  n_hidden = len(mlp.fcs)
  for j in range(n_hidden):
    w = sd[f"fcs.{j}.weight"]
    if j == 0:
      w = w.reshape(-1, channels, pooled, pooled).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
    params[f"mask_fc{j + 1}"] = dict(kernel=w.T, bias=sd[f"fcs.{j}.bias"])
  w, b = sd["logits.weight"], sd["logits.bias"]
  k = b.size // (side * side)
  params["mask_fc_logits"] = dict(
      kernel=w.reshape(k, side, side, -1).transpose(3, 1, 2, 0).reshape(w.shape[1], -1),
      bias=b.reshape(k, side, side).transpose(1, 2, 0).reshape(-1))
  return {"params": jax.tree.map(jnp.asarray, params)}


def test_mlp_head_and_softmax_loss_equal_torch_modules_in_roi_heads(monkeypatch):
  torch, _ = torch_or_skip()
  from torchvision.models.detection import roi_heads as tv_roi_heads
  from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
  from torchvision.ops import MultiScaleRoIAlign
  c = tiny.get_config()
  c.model.mask_head.update(dict(type="mlp", loss="softmax", mlp_layers=(48, 32)))
  head = build_model(c.model).head("mask_head")
  k, ch, s = c.model.num_classes, c.model.fpn.channels, head.pooler.output_size
  torch.manual_seed(0)
  rng = np.random.default_rng(0)

  # One 96 x 128 image: FPN-like maps at strides 4..32, three instances with full-image masks.
  h, w = 96, 128
  feats = collections.OrderedDict(
      (str(i), torch.randn(1, ch, h >> (i + 2), w >> (i + 2))) for i in range(4))
  gt_boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 30.0, 120.0, 90.0],
                           [5.0, 50.0, 40.0, 94.0]])
  yy, xx = np.mgrid[:h, :w]
  masks = []
  for x1, y1, x2, y2 in gt_boxes.numpy():  # an ellipse in each box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    masks.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1)
  target = dict(boxes=gt_boxes, labels=torch.tensor([1, 3, 2]),
                masks=torch.from_numpy(np.stack(masks).astype(np.uint8)))
  g = gt_boxes.numpy()[rng.integers(0, 3, 40)]  # proposals: boxes moved by up to 25% of size
  props = g + rng.uniform(-0.25, 0.25, g.shape) * np.tile(g[:, 2:] - g[:, :2], 2)
  props = np.concatenate([np.minimum(props[:, :2], props[:, 2:] - 2), props[:, 2:]], 1)
  proposals = torch.from_numpy(np.clip(props, 0, [w, h, w, h]).astype(np.float32))

  names = list(feats)
  mlp = _torch_mlp(torch, ch * s * s, head.mlp_layers, k, 2 * s)
  heads = tv_roi_heads.RoIHeads(
      MultiScaleRoIAlign(names, 7, 2), TwoMLPHead(ch * 49, 16), FastRCNNPredictor(16, k),
      0.5, 0.5, 64, 0.25, None, 0.05, 0.5, 100, mask_roi_pool=MultiScaleRoIAlign(names, 14, 2),
      mask_head=mlp, mask_predictor=torch.nn.Identity())
  heads.train()
  record = {}
  monkeypatch.setattr(tv_roi_heads, "maskrcnn_loss", _torch_softmax_loss(torch, record))
  _, losses = heads(feats, [proposals], [(h, w)], [target])
  assert losses["loss_mask"].item() == record["loss"]
  n = len(record["labels"])
  assert n >= 8 and len(set(record["labels"])) == 3 and 0.1 < record["targets"].mean() < 0.9

  # Ours on the same RoIs of the same features.
  variables = _mlp_variables(mlp, s, ch, 2 * s)
  ctx = HeadContext({lvl + 2: jnp.asarray(f.permute(0, 2, 3, 1).numpy())
                     for lvl, f in enumerate(feats.values())}, None, True, None, None, {})
  rois = jnp.asarray(record["rois"])[None]
  labels = jnp.asarray(record["labels"], jnp.int32)

  @jax.jit
  def ours(variables):
    logits = head.apply(variables, ctx.pool(head.pooler, rois)[0])
    loss = maskrcnn_softmax_loss(logits, labels, jnp.asarray(record["targets"]),
                                 jnp.ones(n, bool))
    dets = dict(boxes=rois, labels=labels[None], valid=jnp.ones((1, n), bool))
    return logits, loss, head.apply(variables, ctx._replace(train=False), dets,
                                    method=type(head).predict)["masks"][0]
  logits, loss, masks = jax.device_get(ours(variables))
  ref_logits = record["logits"].transpose(0, 2, 3, 1)
  ref_probs = torch.softmax(torch.from_numpy(record["logits"]), 1).numpy()[np.arange(n),
                                                                            record["labels"]]
  logit_diff = np.abs(logits - ref_logits).max()
  prob_diff = np.abs(masks - ref_probs).max()
  print(f"MLP head + softmax loss on {n} RoIs: max logit diff {logit_diff:.2e} (logits up to "
        f"{np.abs(ref_logits).max():.1f}), loss {float(loss):.6f} vs {record['loss']:.6f}, max "
        f"mask probability diff {prob_diff:.2e}")
  assert logit_diff <= 1e-4 * max(1.0, np.abs(ref_logits).max())
  np.testing.assert_allclose(float(loss), record["loss"], rtol=1e-5, atol=1e-5)
  assert prob_diff <= 1e-5
