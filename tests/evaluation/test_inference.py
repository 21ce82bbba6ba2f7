"""predict(): static shapes (one trace per bucket), input checks, output frame."""
import numpy as np
import pytest

import maskrcnn_jax
from configs import tiny
from maskrcnn_jax.evaluation import inference
from maskrcnn_jax.modeling import build_model
from tests.conftest import quick_variables


@pytest.fixture(scope="module")
def tiny_model():
  cfg = tiny.get_config()
  model = build_model(cfg.model)
  variables = quick_variables(model)
  return model, variables, cfg.input


def _predict(tiny_model, images, **kw):
  model, variables, inp = tiny_model
  kw.setdefault("exact_padding", False)  # the bucketed form (the CPU default is exact)
  return maskrcnn_jax.predict(model, variables, images, min_size=inp.min_size,
                              max_size=inp.max_size, **kw)


def test_one_trace_per_bucket(tiny_model):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            for h, w in [(100, 120), (90, 128), (110, 100), (64, 64)]]
  before = inference.TRACE_COUNTS["forward"]
  out = _predict(tiny_model, images)
  assert inference.TRACE_COUNTS["forward"] - before == 1  # all four land in the 128 x 128 bucket
  out2 = _predict(tiny_model, [rng.integers(0, 255, (77, 101, 3), dtype=np.uint8)])
  assert inference.TRACE_COUNTS["forward"] - before == 1  # a new size, same bucket: no retrace
  for im, r in zip(images, out):
    n = len(r["scores"])
    assert r["boxes"].shape == (n, 4) and r["labels"].shape == (n,)
    assert r["masks"].shape == (n,) + im.shape[:2]
    assert np.all(np.diff(r["scores"]) <= 0)
    assert np.all(r["boxes"][:, [0, 2]] <= im.shape[1] + 1e-3)
    assert np.all(r["boxes"][:, [1, 3]] <= im.shape[0] + 1e-3)
    assert np.all((r["labels"] >= 1) & (r["labels"] < 4))
  assert out2[0]["masks"].shape[1:] == (77, 101)
  # A tall image under a larger size cap needs another bucket (256 x 128): exactly one more trace.
  model, variables, inp = tiny_model
  maskrcnn_jax.predict(model, variables, [rng.integers(0, 255, (200, 90, 3), dtype=np.uint8)],
                       min_size=inp.min_size, max_size=256, exact_padding=False)
  assert inference.TRACE_COUNTS["forward"] - before == 2


def test_batching_gives_the_same_results(tiny_model):
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(96, 128), (120, 100),
                                                                        (80, 80)]]
  one = _predict(tiny_model, images, batch_size=1)
  two = _predict(tiny_model, images, batch_size=2)
  for a, b in zip(one, two):
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)
    np.testing.assert_allclose(a["masks"], b["masks"], atol=1e-4)


def test_bad_inputs_give_clear_errors(tiny_model):
  good = np.zeros((64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match="empty"):
    _predict(tiny_model, [])
  with pytest.raises(TypeError, match="uint8"):
    _predict(tiny_model, [good.astype(np.float32)])
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    _predict(tiny_model, [np.zeros((64, 64, 4), np.uint8)])
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    _predict(tiny_model, [np.zeros((64, 64), np.uint8)])
  with pytest.raises(TypeError, match="list"):
    _predict(tiny_model, good)
  with pytest.raises(TypeError, match="numpy"):
    _predict(tiny_model, [good.tolist()])
  with pytest.raises(ValueError, match="bucket"):
    _predict(tiny_model, [good], bucket=100)


def test_unknown_config_keys_are_errors():
  cfg = tiny.get_config()
  cfg.model.box_head.fc_layer = (12,)  # a typo of fc_layers
  with pytest.raises(ValueError, match="fc_layer"):
    build_model(cfg.model)
  cfg = tiny.get_config()
  cfg.model.box_pooler.type = "bogus"  # checked when the model is built, not when traced
  with pytest.raises(ValueError, match="box_pooler.*bogus"):
    build_model(cfg.model)


def test_heads_run_on_a_bucket_of_the_valid_detections():
  """The RoI heads run on the smallest power of two of slots holding the valid detections, and
  give what the one-program forward over all D slots gives."""
  v = np.zeros((2, 100), bool)
  assert inference.head_slots(v) == 1
  v[0, :3] = True
  v[1, :9] = True
  assert inference.head_slots(v) == 16
  v[1, :] = True
  assert inference.head_slots(v) == 100
  v[0, 50] = True  # not a prefix: all slots
  assert inference.head_slots(v) == 100

  cfg = tiny.get_config()
  cfg.model.postprocess.score_threshold = 0.4  # 32 and 24 valid detections of 100 here
  model = build_model(cfg.model)
  variables = quick_variables(model)
  rng = np.random.default_rng(4)
  batch = (rng.normal(size=(2, 128, 128, 3)) * 0.5).astype(np.float32)
  sizes = np.array([[128, 128], [100, 120]], np.int32)
  before = inference.TRACE_COUNTS["heads"]
  staged = inference._two_stage_forward(model, variables, batch, sizes, sizes)()
  assert inference.TRACE_COUNTS["heads"] - before == 1
  whole = inference._forward(model, variables, batch, sizes, sizes)
  slots = staged["masks"].shape[1]
  valid = np.asarray(whole["valid"])
  assert slots == 32 and valid.sum(1).tolist() == [32, 24]
  for k in ("boxes", "scores", "labels", "valid"):  # the detections, cut to the bucket
    np.testing.assert_array_equal(staged[k], np.asarray(whole[k])[:, :slots])
  np.testing.assert_array_equal(staged["proposals"], whole["proposals"])
  np.testing.assert_allclose(np.asarray(staged["masks"])[valid[:, :slots]],
                             np.asarray(whole["masks"])[valid], atol=1e-5)


def test_masks_thresholded_on_the_device(tiny_model):
  images = [np.random.default_rng(2).integers(0, 255, (90, 110, 3), dtype=np.uint8)]
  probs = _predict(tiny_model, images)[0]
  binary = _predict(tiny_model, images, mask_threshold=0.5)[0]
  assert binary["masks"].dtype == bool and len(probs["scores"]) > 0
  np.testing.assert_array_equal(binary["masks"], probs["masks"] > 0.5)
