"""draw_predictions: masks painted where they are and nowhere else, scale, threshold, labels that
do not cover each other."""
import numpy as np
from PIL import ImageDraw

from maskrcnn_jax.evaluation import visualize


def _result():
  masks = np.zeros((3, 40, 60), np.float32)
  masks[0, 5:15, 5:20] = 0.9      # object 0
  masks[1, 20:35, 30:55] = 0.8    # object 1
  masks[2, 0:40, 0:60] = 0.9      # below the score threshold: not drawn
  return dict(boxes=np.array([[5, 5, 20, 15], [30, 20, 55, 35], [0, 0, 60, 40]], np.float32),
              scores=np.array([0.9, 0.7, 0.3], np.float32), labels=np.array([1, 2, 1]),
              masks=masks)


def test_masks_boxes_scale_and_threshold():
  image = np.full((40, 60, 3), 100, np.uint8)
  pic = visualize.draw_predictions(image, _result(), ["background", "a", "b"], min_side=160)
  out = np.asarray(pic)
  assert out.shape == (160, 240, 3)                       # enlarged 4x (short side 40 -> 160)
  # Inside mask 0 (away from its box outline and label): tinted towards colour 0.
  expected = 0.55 * 100 + 0.45 * np.array(visualize._colour(0), np.float64)
  np.testing.assert_allclose(out[4 * 10, 4 * 12], expected, atol=1.0)
  # Far from both detections: untouched (the low-score full-image mask is not painted).
  np.testing.assert_array_equal(out[4 * 36, 4 * 5], [100, 100, 100])
  # Box outline of detection 1 in its colour.
  np.testing.assert_array_equal(out[4 * 28, 4 * 30], visualize._colour(1))


def test_labels_of_coinciding_boxes_do_not_overlap():
  from PIL import Image
  draw = ImageDraw.Draw(Image.new("RGB", (200, 200)))
  font = visualize._font(14)
  placed = []
  for _ in range(3):  # three boxes with the same corner
    r = visualize._place_label(draw, "square 0.99", font, [50, 50, 150, 150], placed, (200, 200))
    for q in placed:
      assert r[2] <= q[0] or q[2] <= r[0] or r[3] <= q[1] or q[3] <= r[1], (r, q)
    assert 0 <= r[0] and r[2] <= 200 and 0 <= r[1] and r[3] <= 200
    placed.append(r)
  # A label at the picture's top edge stays inside the picture.
  r = visualize._place_label(draw, "circle 1.00", font, [190, 0, 199, 10], [], (200, 200))
  assert r[0] >= 0 and r[1] >= 0 and r[2] <= 200
