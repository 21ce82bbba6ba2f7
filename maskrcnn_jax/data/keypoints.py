"""Keypoint bookkeeping shared by the builder, the transforms and the model side (stdlib only).

Keypoints follow COCO's `person_keypoints` convention: K named points per object, each (x, y, v)
in image pixels (continuous coordinates: pixel k spans [k, k + 1)), v = 0 not labelled (and then
(x, y, v) = (0, 0, 0)), 1 labelled but occluded, 2 labelled and visible.

A horizontal flip maps x to W - x and swaps the left and right points: `flip_permutation(names)`
pairs `left_<s>` with `right_<s>`; a name without a partner maps to itself. For COCO's 17 person
keypoints this gives torchvision's `flip_inds` [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13,
16, 15].
"""

COCO_PERSON_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle")

_SIDES = (("left_", "right_"), ("right_", "left_"))


def flip_permutation(names):
  """The keypoint order after a horizontal flip, derived from the names.

  Args:
    names: K keypoint names (unique strings).

  Returns:
    tuple of K ints: point k of a flipped object is point `perm[k]` of the original (mirrored).
    `left_<s>` <-> `right_<s>` when both exist; any other name maps to itself.
  """
  names = tuple(str(n) for n in names)
  index = {n: i for i, n in enumerate(names)}
  if len(index) != len(names):
    raise ValueError(f"keypoint names are not unique: {list(names)}")
  perm = []
  for i, n in enumerate(names):
    partner = i
    for prefix, other in _SIDES:
      if n.startswith(prefix):
        partner = index.get(other + n[len(prefix):], i)
    perm.append(partner)
  return tuple(perm)


def check_flip_permutation(perm, num_keypoints):
  """Validates an explicit flip permutation: K indices forming a permutation of range(K) that is
  its own inverse (flipping twice must give the original points back). Returns it as a tuple."""
  try:
    perm = tuple(int(p) for p in perm)
  except (TypeError, ValueError):
    raise ValueError(f"keypoint flip permutation must be a list of ints, got {perm!r}") from None
  k = int(num_keypoints)
  if sorted(perm) != list(range(k)):
    raise ValueError(f"keypoint flip permutation {list(perm)} is not a permutation of "
                     f"range({k})")
  if any(perm[perm[i]] != i for i in range(k)):
    raise ValueError(f"keypoint flip permutation {list(perm)} is not its own inverse (a flip "
                     "swaps pairs of points)")
  return perm


def resolve_flip_permutation(names, override=None):
  """`override` (checked) when it is non-empty, else `flip_permutation(names)`."""
  if override is not None and len(tuple(override)):
    return check_flip_permutation(override, len(tuple(names)))
  return flip_permutation(names)
