"""Array aliases and the shape-letter glossary used in every docstring.

Letters: B batch, H/W image or feature height/width, C channels, A anchors, N proposals or
detections, M ground-truth instances, R sampled RoIs, K classes (background included), S crop size,
L pyramid levels.

Boxes are always `(x1, y1, x2, y2)` in absolute pixels of the frame named in the docstring (the
resized, padded network input unless stated otherwise). Images are NHWC.
"""
from typing import Any

import jax

Array = jax.Array
PyTree = Any
