"""Synthetic keypoints: stick figures with 11 named joints, as a COCO person_keypoints folder.

    python -m maskrcnn_jax.data.keypoint_shapes --out DIR --num_train 1000 --num_val 100 --seed 0

writes `DIR/{train,val}/NNNNNN.png` and `DIR/annotations/person_keypoints_{train,val}.json` (the
layout `prepare_coco_format(DIR, ..., annotations='person_keypoints')` reads). Each image has the
textured backgrounds of `maskrcnn_jax.data.shapes` and 1-4 stick figures of one category,
`figure` (id 1), whose JSON entry carries

  keypoints  head, neck, left_elbow, right_elbow, left_hand, right_hand, hip, left_knee,
             right_knee, left_foot, right_foot (K = 11)
  skeleton   1-based pairs as COCO: head-neck, neck-elbow-hand (both sides), neck-hip,
             hip-knee-foot (both sides)
  sigmas     0.1 for every keypoint (OKS sigmas, a non-standard field; COCO's person sigmas are
             0.025-0.107). With pycocotools' OKS = exp(-d^2 / (2 area (2 sigma)^2)) and figure
             areas (visible mask pixels) of about 130-1300 at 128 px (median ~600), a joint found
             1 px off scores 0.91-0.99 (0.98 at the median area), 2 px off 0.68-0.96 (0.92).
             Keypoint AP (COCOeval) of the ground truth with every joint moved by d pixels in a
             random direction, 100 val images at 128 px: d = 1: 0.98, 1.5: 0.90, 2: 0.79, 3: 0.51
             (with sigmas 0.08: 0.95, 0.82, 0.66, 0.32).

A figure is a head (a disc), a torso, two arms (upper arm and forearm) and two legs (thigh and
shin), drawn as thick segments in one flat colour, with a disc in a second colour (the first + 128
per channel, mod 256) on every joint but the head, so each keypoint is a visible place: the head
disc's centre, the joint discs' centres. Figures face the viewer: the figure's left limbs are
always on its left side of the body axis (the image's right when upright, whatever the lean), so
left and right are told apart by their side, a cue that a horizontal flip mirrors consistently
(the flip swaps the labels and the sides together, as for people).

Random per figure: height 25-70% of the image (32-90 px at 128), lean (-25 to 25 degrees), limb
angles (arms 25-155 degrees from hanging down, forearms bent up to 50 degrees, legs 18-40 degrees
out, knees bent; every joint stays on its own side), colours (kept away from the background's
mean colour), position (the figure may stick out of the image by ~8% of its height). Placement
avoids large overlaps (box IoU at most `max_overlap` when 10 tries allow it). Figures are painted
in order, later ones occluding earlier ones; a figure less than `min_visible_fraction` visible
(default half) is removed, as in `shapes`.

Annotations: `segmentation` the visible pixels, exact (compressed RLE); `area` their count (COCO's
OKS uses it); `bbox` the figure's full extent (occluded parts included) clipped to the image;
`keypoints` (x, y, v) in pixels (pixel k spans [k, k + 1)), v = 2 visible, 1 covered by a later
figure, 0 outside the image (then (0, 0, 0)); `num_keypoints` the count of v > 0.

Everything is reproducible from `seed`: image i of a split depends only on (seed, split, i).
"""
import argparse

import numpy as np

from maskrcnn_jax.data import shapes

KEYPOINT_NAMES = ("head", "neck", "left_elbow", "right_elbow", "left_hand", "right_hand", "hip",
                  "left_knee", "right_knee", "left_foot", "right_foot")
SKELETON = ((1, 2), (2, 3), (3, 5), (2, 4), (4, 6), (2, 7), (7, 8), (8, 10), (7, 9), (9, 11))
SIGMAS = (0.1,) * len(KEYPOINT_NAMES)
CATEGORY = {"id": 1, "name": "figure", "supercategory": "figure",
            "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(p) for p in SKELETON],
            "sigmas": list(SIGMAS)}

_HEAD = 0
_STREAM = 1  # shapes.image_rng stream: other images than `shapes` makes from the same seed.

# Body proportions, in figure heights.
_TORSO, _NECK, _HEAD_R = 0.30, 0.11, 0.09
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.17, 0.15, 0.22, 0.21


def pose_figure(x, y, height, lean=0.0, arms=(90.0, 90.0), elbows=(0.0, 0.0), legs=(20.0, 20.0),
                knees=(0.0, 0.0), color=(255, 0, 0)):
  """One figure's keypoints and drawing sizes.

  Angles are in degrees. Limb angles are measured from hanging straight down, outwards on the
  limb's own side (left limbs on the figure's left = the image's +x side when upright).

  Args:
    x, y: hip position in pixels.
    height: figure size in pixels (head top to feet is about 0.93 height with straight legs).
    lean: rotation of the whole figure about the hip, clockwise on screen (y points down).
    arms: (left, right) upper-arm angles: 0 hanging down, 90 horizontal, 180 straight up.
    elbows: (left, right) forearm angle added to the upper arm's.
    legs: (left, right) thigh angles; knees: (left, right) shin angle added to the thigh's.
    color: 3 ints, the limbs' colour; joints get (color + 128) % 256.

  Returns:
    dict with keypoints [K, 2] float64 (x, y) pixels in KEYPOINT_NAMES order, thickness (limb
    width), joint_radius, head_radius (pixels), color, joint_color (3 ints each).
  """
  h = float(height)

  def limb(start, angle, length, side):
    a = np.deg2rad(angle)
    return start + length * h * np.array([side * np.sin(a), np.cos(a)])
  hip = np.zeros(2)
  neck = np.array([0.0, -_TORSO * h])
  head = neck - [0.0, _NECK * h]
  pts = {"head": head, "neck": neck, "hip": hip}
  for side, name, i in ((1.0, "left", 0), (-1.0, "right", 1)):
    pts[f"{name}_elbow"] = limb(neck, arms[i], _UPPER_ARM, side)
    pts[f"{name}_hand"] = limb(pts[f"{name}_elbow"], arms[i] + elbows[i], _FOREARM, side)
    pts[f"{name}_knee"] = limb(hip, legs[i], _THIGH, side)
    pts[f"{name}_foot"] = limb(pts[f"{name}_knee"], legs[i] + knees[i], _SHIN, side)
  local = np.stack([pts[n] for n in KEYPOINT_NAMES])
  t = np.deg2rad(lean)
  rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
  thickness = max(2.0, 0.055 * h)
  color = [int(c) for c in color]
  return {"keypoints": local @ rot.T + [float(x), float(y)], "thickness": thickness,
          "joint_radius": 0.5 * thickness + max(1.0, 0.025 * h), "head_radius": _HEAD_R * h,
          "color": color, "joint_color": [(c + 128) % 256 for c in color]}


def _radii(fig):
  r = np.full(len(KEYPOINT_NAMES), fig["joint_radius"])
  r[_HEAD] = fig["head_radius"]
  return r


def figure_extent(fig):
  """(x1, y1, x2, y2) pixels covering everything the figure draws (not clipped)."""
  kp, r = fig["keypoints"], _radii(fig)
  return np.concatenate([(kp - r[:, None]).min(0), (kp + r[:, None]).max(0)])


def rasterize_figure(fig, size):
  """The figure's pixels in a `size` x `size` image (pixel centres inside a shape).

  Returns:
    limbs [S, S] bool (segments and head disc), joints [S, S] bool (joint discs, drawn on top);
    their union is the figure's full mask.
  """
  limbs = np.zeros((size, size), bool)
  joints = np.zeros((size, size), bool)
  x1, y1, x2, y2 = figure_extent(fig)
  c0, r0 = max(int(np.floor(x1)) - 1, 0), max(int(np.floor(y1)) - 1, 0)
  c1, r1 = min(int(np.ceil(x2)) + 1, size), min(int(np.ceil(y2)) + 1, size)
  if c1 <= c0 or r1 <= r0:
    return limbs, joints
  xx, yy = np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5, indexing="xy")
  kp = fig["keypoints"]
  half = 0.5 * fig["thickness"]
  win_l = np.zeros(xx.shape, bool)
  for a, b in SKELETON:
    p, q = kp[a - 1], kp[b - 1]
    d = q - p
    t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(float(d @ d), 1e-12), 0, 1)
    win_l |= (xx - p[0] - t * d[0]) ** 2 + (yy - p[1] - t * d[1]) ** 2 <= half * half
  win_l |= (xx - kp[_HEAD, 0]) ** 2 + (yy - kp[_HEAD, 1]) ** 2 <= fig["head_radius"] ** 2
  win_j = np.zeros(xx.shape, bool)
  for k in range(len(KEYPOINT_NAMES)):
    if k != _HEAD:
      win_j |= (xx - kp[k, 0]) ** 2 + (yy - kp[k, 1]) ** 2 <= fig["joint_radius"] ** 2
  limbs[r0:r1, c0:c1] = win_l
  joints[r0:r1, c0:c1] = win_j
  return limbs, joints


def _box_iou(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _random_color(rng, bg_mean):
  """A colour whose own and joint colours both stand out from the background's mean colour."""
  best, best_score = None, -1.0
  for _ in range(20):
    c = rng.integers(0, 256, 3)
    score = min(np.linalg.norm(c - bg_mean), np.linalg.norm((c + 128) % 256 - bg_mean))
    if score > best_score:
      best, best_score = c, score
    if score >= 80:
      break
  return [int(v) for v in best]


def random_figure(rng, size, bg_mean, others=(), max_overlap=0.3):
  """A figure with a random pose, colour and place (see the module docstring).

  Args:
    rng: numpy Generator.
    size: image side S.
    bg_mean: [3] the background's mean colour.
    others: extents (x1, y1, x2, y2) of the figures placed before; up to 10 positions are tried
      for one whose extent's IoU with each is at most `max_overlap` (else the least overlapping).
  """
  height = rng.uniform(0.25, 0.7) * size
  lean = rng.uniform(-25, 25)
  arms = rng.uniform(25, 155, 2)
  elbows = np.clip(arms + rng.uniform(-50, 50, 2), 15, 170) - arms
  legs = rng.uniform(18, 40, 2)
  knees = np.clip(legs + rng.uniform(-10, 30, 2), 18, 60) - legs
  color = _random_color(rng, bg_mean)
  fig = pose_figure(0.0, 0.0, height, lean, arms, elbows, legs, knees, color)
  ext = figure_extent(fig)
  margin = 0.08 * height
  lo = -margin - ext[:2]
  hi = size + margin - ext[2:]
  best, best_overlap = None, np.inf
  for _ in range(10):
    offset = np.where(hi > lo, lo + rng.uniform(0, 1, 2) * (hi - lo), 0.5 * (lo + hi))
    box = ext + np.tile(offset, 2)
    overlap = max([_box_iou(box, o) for o in others], default=0.0)
    if overlap < best_overlap:
      best, best_overlap = offset, overlap
    if overlap <= max_overlap:
      break
  return pose_figure(best[0], best[1], height, lean, arms, elbows, legs, knees, color)


def render_image(seed, split, index, image_size=128, min_figures=1, max_figures=4,
                 min_visible_area=16, min_visible_fraction=0.5, max_overlap=0.3, figures=None):
  """One synthetic image and its figures.

  Args:
    seed, split, index: what the image depends on.
    image_size: S.
    min_figures, max_figures: how many figures are drawn (before hidden ones are removed).
    min_visible_area, min_visible_fraction: a figure with fewer visible pixels is removed.
    max_overlap: placement's box IoU limit (see `random_figure`).
    figures: `pose_figure` dicts to draw instead of random ones (the background stays random).

  Returns:
    image: [S, S, 3] uint8.
    objects: in painting order, dicts with 'category_id' (1), 'mask' [S, S] bool (visible pixels),
      'full' [S, S] bool (all its pixels in the image), 'keypoints' [K, 3] float64 (x, y, v)
      pixels rounded to 0.01 (v = 0 points are (0, 0, 0)), 'num_keypoints', 'bbox' [x, y, w, h]
      of 'full', 'visible_fraction', 'color', 'joint_color'.
  """
  rng = shapes.image_rng(seed, split, index, _STREAM)
  size = int(image_size)
  image = shapes.background(rng, size)
  bg_mean = image.reshape(-1, 3).mean(0)
  if figures is None:
    figures = []
    for _ in range(int(rng.integers(min_figures, max_figures + 1))):
      figures.append(random_figure(rng, size, bg_mean, [figure_extent(f) for f in figures],
                                   max_overlap))
  objects = []
  for fig in figures:
    limbs, joints = rasterize_figure(fig, size)
    objects.append({"fig": fig, "limbs": limbs, "joints": joints, "full": limbs | joints})
  keep = shapes.remove_hidden(objects, min_visible_area, min_visible_fraction)
  out = []
  for i, o in enumerate(keep):
    fig = o["fig"]
    image[o["mask"] & ~o["joints"]] = fig["color"]
    image[o["mask"] & o["joints"]] = fig["joint_color"]
    covered = np.zeros((size, size), bool)
    for later in keep[i + 1:]:
      covered |= later["full"]
    xy = np.round(fig["keypoints"], 2)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < size) & (xy[:, 1] >= 0) & (xy[:, 1] < size)
    col = np.clip(np.floor(xy[:, 0]).astype(int), 0, size - 1)
    row = np.clip(np.floor(xy[:, 1]).astype(int), 0, size - 1)
    v = np.where(inside, np.where(covered[row, col], 1, 2), 0)
    kps = np.concatenate([xy, v[:, None]], 1) * (v > 0)[:, None]
    ys, xs = np.nonzero(o["full"])
    out.append({"category_id": 1, "mask": o["mask"], "full": o["full"], "keypoints": kps,
                "num_keypoints": int(np.count_nonzero(v)),
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                         float(ys.max() - ys.min() + 1)],
                "visible_fraction": float(o["mask"].sum() / o["full"].sum()),
                "color": fig["color"], "joint_color": fig["joint_color"]})
  return image, out


def write_split(out_dir, split, num_images, seed, image_size=128, **kwargs):
  """Writes `out_dir/<split>/*.png` and `out_dir/annotations/person_keypoints_<split>.json`."""
  def render(i):
    image, objects = render_image(seed, split, i, image_size, **kwargs)
    anns = []
    for o in objects:
      ann = dict(category_id=1, **shapes.mask_annotation(o["mask"]))
      ann["bbox"] = o["bbox"]
      ann["keypoints"] = [float(v) if j % 3 < 2 else int(v)
                          for j, v in enumerate(o["keypoints"].ravel())]
      ann["num_keypoints"] = o["num_keypoints"]
      anns.append(ann)
    return image, anns
  return shapes.write_coco_split(out_dir, split, num_images, render, [CATEGORY],
                                 "person_keypoints",
                                 f"maskrcnn_jax synthetic keypoint figures, seed {seed}")


def generate_keypoint_shapes(out_dir, num_train, num_val, seed=0, image_size=128, **kwargs):
  """Writes the train and val splits; returns {split: annotation file}.

  Args:
    out_dir: the output folder.
    num_train, num_val: images per split (a split with 0 is not written).
    seed: everything follows from it.
    image_size: S, images are S x S.
    **kwargs: `render_image`'s min_figures, max_figures, min_visible_area, min_visible_fraction,
      max_overlap.
  """
  out = {}
  for split, n in (("train", num_train), ("val", num_val)):
    if n > 0:
      out[split] = write_split(out_dir, split, n, seed, image_size, **kwargs)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--num_train", type=int, default=1000)
  p.add_argument("--num_val", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--min_figures", type=int, default=1)
  p.add_argument("--max_figures", type=int, default=4)
  p.add_argument("--min_visible_fraction", type=float, default=0.5,
                 help="drop figures with less than this fraction of their pixels visible")
  p.add_argument("--max_overlap", type=float, default=0.3,
                 help="placement tries to keep the box IoU between figures at most this")
  args = p.parse_args(argv)
  paths = generate_keypoint_shapes(args.out, args.num_train, args.num_val, args.seed,
                                   args.image_size, min_figures=args.min_figures,
                                   max_figures=args.max_figures,
                                   min_visible_fraction=args.min_visible_fraction,
                                   max_overlap=args.max_overlap)
  for split, path in paths.items():
    print(f"{split}: {path}")


if __name__ == "__main__":
  main()
