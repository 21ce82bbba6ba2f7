"""Pictures of predictions (masks, boxes, keypoint skeletons, class names, scores) and training
curves, as PNG files."""
import colorsys
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _colour(i: int):
  h = (i * 0.618033988749895) % 1.0
  r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
  return int(r * 255), int(g * 255), int(b * 255)


def draw_predictions(image: np.ndarray, result: Mapping[str, np.ndarray],
                     class_names: Optional[Sequence[str]] = None, score_threshold: float = 0.5,
                     mask_threshold: float = 0.5, min_side: int = 512,
                     alpha: float = 0.45, skeleton: Optional[Sequence[Sequence[int]]] = None,
                     keypoint_threshold: Optional[float] = None) -> Image.Image:
  """Draws each detection's mask, box, keypoints (and skeleton), class name and score over the
  image.

  Args:
    image: [H, W, 3] uint8 RGB.
    result: `predict` output for the image (boxes [N, 4] (x1, y1, x2, y2) original pixels, scores
      [N], labels [N], optional masks [N, H, W], keypoints [N, K, 3] (x, y, v) original pixels
      and keypoints_scores [N, K]).
    class_names: name per label index (index 0 = background); None prints the label number.
    score_threshold: detections below it are not drawn.
    mask_threshold: mask probabilities above it are painted.
    min_side: small images are enlarged (nearest) to this short side so that labels stay readable.
    alpha: mask opacity.
    skeleton: keypoint pairs to join by lines, 1-based as COCO's category `skeleton`.
    keypoint_threshold: points whose score is below it are not drawn (None: every point with
      v > 0).

  Returns:
    A PIL RGB image (enlarged by an integer factor when the input is small).
  """
  h, w = image.shape[:2]
  factor = max(1, int(np.ceil(min_side / min(h, w))))
  canvas = np.repeat(np.repeat(image.astype(np.float32), factor, 0), factor, 1)
  keep = np.nonzero(np.asarray(result["scores"]) >= score_threshold)[0]
  if "masks" in result:
    for rank, i in enumerate(keep):
      m = np.asarray(result["masks"][i]) > mask_threshold
      m = np.repeat(np.repeat(m, factor, 0), factor, 1)
      canvas[m] = (1 - alpha) * canvas[m] + alpha * np.array(_colour(rank), np.float32)
  pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  font = _font(max(12, min(pil.size) // 32))
  if "keypoints" in result:
    for rank, i in enumerate(keep):
      _draw_keypoints(draw, np.asarray(result["keypoints"][i], np.float64), factor,
                      None if "keypoints_scores" not in result else
                      np.asarray(result["keypoints_scores"][i]),
                      skeleton or (), keypoint_threshold, _colour(rank))
  labels = []
  for rank, i in enumerate(keep):
    box = (np.asarray(result["boxes"][i], np.float64) * factor).tolist()
    draw.rectangle(box, outline=_colour(rank), width=max(2, factor))
    label = int(result["labels"][i])
    known = class_names is not None and label < len(class_names)
    name = class_names[label] if known else str(label)
    labels.append((box, f"{name} {float(result['scores'][i]):.2f}", _colour(rank)))
  # Labels after all boxes, so that no box is drawn over one, each where it overlaps none before.
  placed = []
  for box, text, col in labels:
    bg = _place_label(draw, text, font, box, placed, pil.size)
    placed.append(bg)
    draw.rectangle(bg, fill=(0, 0, 0))
    left, top = draw.textbbox((0, 0), text, font=font)[:2]  # the glyphs' offset from the origin
    draw.text((bg[0] + 2 - left, bg[1] + 2 - top), text, fill=col, font=font)
  return pil


def _draw_keypoints(draw, points, factor, scores, skeleton, threshold, colour):
  """One detection's points [K, 3] (x, y, v) original pixels: skeleton lines between shown points,
  then a dot per shown point (v > 0, and score >= threshold when both are given)."""
  shown = points[:, 2] > 0
  if threshold is not None and scores is not None:
    shown &= scores >= threshold
  xy = points[:, :2] * factor
  width = max(2, factor)
  for a, b in skeleton:
    a, b = int(a) - 1, int(b) - 1
    if 0 <= a < len(xy) and 0 <= b < len(xy) and shown[a] and shown[b]:
      draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=width)
  r = 1.5 * width
  for (x, y), ok in zip(xy, shown):
    if ok:
      draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(0, 0, 0))


def _place_label(draw, text, font, box, placed, size):
  """The [x1, y1, x2, y2] background of `text` for `box`: above its top-left corner, else inside
  it, else below it, else inside its bottom; the first that overlaps no label in `placed` (else
  the first), moved inside the picture."""
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  tw, th = right - left + 4, bottom - top + 4
  x1, y1, x2, y2 = box
  candidates = [(x1, y1 - th), (x1, y1), (x1, y2), (x1, y2 - th)]

  def rect(x, y):
    x = min(max(0.0, x), max(0.0, size[0] - tw))
    y = min(max(0.0, y), max(0.0, size[1] - th))
    return [x, y, x + tw, y + th]

  def free(r):
    return all(r[2] <= q[0] or q[2] <= r[0] or r[3] <= q[1] or q[3] <= r[1] for q in placed)
  for x, y in candidates:
    if free(rect(x, y)):
      return rect(x, y)
  return rect(*candidates[0])


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has one fixed-size default font
    return ImageFont.load_default()


def plot_curves(steps_and_values: Mapping[str, Sequence], path, title: str = "training") -> None:
  """Plots named curves `{name: [(step, value), ...]}` to a PNG (losses log-scaled, AP linear).

  Names starting with 'loss' go to the left panel, everything else (AP) to the right one; names
  ending in 'AP50' are dashed.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, pts in sorted(steps_and_values.items()):
    if not pts:
      continue
    s, v = zip(*pts)
    (ax_l if name.startswith("loss") or name.startswith("train/") else ax_r).plot(
        s, v, label=name, marker="" if len(s) > 20 else "o",
        linestyle="--" if name.endswith("AP50") else "-")
  ax_l.set_yscale("log")
  ax_l.set_xlabel("step")
  ax_l.set_title(f"{title}: losses")
  ax_r.set_xlabel("step")
  ax_r.set_title(f"{title}: COCO AP")
  ax_r.set_ylim(0, 1)
  for ax in (ax_l, ax_r):
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
