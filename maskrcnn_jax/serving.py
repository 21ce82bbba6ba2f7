"""Runs the artifacts of `python -m maskrcnn_jax.export` with jax and numpy alone.

    from maskrcnn_jax import serving
    detector = serving.load("exported/")      # reads serving.json, weights.npz, canvas_*.jax
    results = detector([image_uint8_hwc, ...])  # the same list of dicts as maskrcnn_jax.predict

No flax and no model code is imported: the forward is the serialized program, the weights an
input; the host pre- and post-processing is `predict`'s own (numpy, plus a jitted jnp mask paste).
"""
import json
import os
from typing import Dict, List, Sequence, Tuple

import jax
import numpy as np

from maskrcnn_jax import paths
from maskrcnn_jax.evaluation import inference

# The contract's names (maskrcnn_jax.export imports flax only inside its functions).
from maskrcnn_jax.export import CONTRACT_FILE, FORMAT, VERSION


class Detector:
  """A loaded export: call it on a list of `[H, W, 3] uint8` RGB images."""

  def __init__(self, directory: str, contract: Dict, weights: Sequence[np.ndarray],
               programs: Dict[Tuple[int, int], "jax.export.Exported"]):
    self.directory = directory
    self.contract = contract
    self.canvases = sorted(programs, key=lambda c: (c[0] * c[1], c))
    self.point_keys = tuple(contract["postprocess"]["point_keys"])
    pre = contract["preprocess"]
    self.min_size, self.max_size = int(pre["min_size"]), int(pre["max_size"])
    self._weights = jax.device_put(list(weights))  # once, reused by every call
    self._calls = {c: jax.jit(p.call) for c, p in programs.items()}

  def canvas_for(self, padded: Tuple[int, int]) -> Tuple[int, int]:
    """The smallest exported canvas holding a padded (h, w); ValueError if none does."""
    for c in self.canvases:
      if c[0] >= padded[0] and c[1] >= padded[1]:
        return c
    raise ValueError(f"no exported canvas holds a resized image padded to {padded[0]}x"
                     f"{padded[1]} (canvases: {['x'.join(map(str, c)) for c in self.canvases]}); "
                     "export one with --canvases")

  def __call__(self, images: List[np.ndarray], batch_size: int = 1,
               mask_threshold: float = None) -> List[Dict[str, np.ndarray]]:
    """Detections per image, as `maskrcnn_jax.predict` returns them (see there).

    Args:
      images: list of [H, W, 3] uint8 RGB arrays, any sizes.
      batch_size: images per call (the artifacts take any batch size).
      mask_threshold: if given, masks are returned as bool `prob > mask_threshold`.
    """
    inference._check_images(images)
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    prepared = inference.prepare_images(images, self.min_size, self.max_size)
    for p in prepared:
      p["canvas"] = self.canvas_for(p["padded"])

    def forward(batch, sizes, padded):
      call = self._calls[batch.shape[1:3]]
      return call(self._weights, batch, sizes, padded)

    return inference.run_batches(prepared, forward, batch_size, 128, mask_threshold,
                                 self.point_keys)


def load(directory: str) -> Detector:
  """Reads an export folder (local or a URL such as gs://...).

  Raises:
    FileNotFoundError: no `serving.json` there.
    ValueError: a contract of another format or version, or weights that do not match it.
  """
  root = paths.as_path(paths.resolve(directory))
  contract_path = root / CONTRACT_FILE
  if not contract_path.exists():
    raise FileNotFoundError(f"{os.fspath(root)!r} holds no {CONTRACT_FILE} (write one with "
                            "python -m maskrcnn_jax.export)")
  contract = json.loads(contract_path.read_text())
  if contract.get("format") != FORMAT or contract.get("version") != VERSION:
    raise ValueError(f"{os.fspath(contract_path)!r} is not a {FORMAT} contract of version "
                     f"{VERSION} (format {contract.get('format')!r}, version "
                     f"{contract.get('version')!r})")
  names = contract["weights"]["names"]
  with (root / contract["weights"]["file"]).open("rb") as f:
    stored = np.load(f)
    missing = sorted(set(names) - set(stored.files))
    if missing:
      raise ValueError(f"weights file lacks {len(missing)} arrays of the contract, e.g. "
                       f"{missing[:3]}")
    weights = [stored[n] for n in names]
  programs = {}
  backend = jax.default_backend()
  for item in contract["artifacts"]:
    exported = jax.export.deserialize(bytearray((root / item["file"]).read_bytes()))
    if backend not in exported.platforms:
      raise ValueError(f"{item['file']} was exported for {list(exported.platforms)}, not for this "
                       f"{backend!r} backend: export again with --platforms including {backend}")
    programs[tuple(int(v) for v in item["canvas"])] = exported
  return Detector(os.fspath(root), contract, weights, programs)
