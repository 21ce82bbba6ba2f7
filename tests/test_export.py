"""Serving export: `python -m maskrcnn_jax.export` writes jax.export artifacts (cpu, cuda and tpu
from this CPU machine), and `maskrcnn_jax.serving.load` runs them in a fresh process that never
imports flax or the model code, giving the same detections as `maskrcnn_jax.predict`."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import maskrcnn_jax
from configs import tiny
from maskrcnn_jax import export
from maskrcnn_jax.modeling import build_model
from tests.conftest import quick_variables
from tests.training import common

# Sizes under the tiny config (96 / 128 px): landscape, portrait, square, one tiny.
SIZES = [(100, 120), (130, 90), (64, 64), (20, 37)]


def _images(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 255, s + (3,), dtype=np.uint8) for s in SIZES]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A tiny model, its variables and its CLI export (all three platforms) from a checkpoint."""
  from maskrcnn_jax.training.checkpoint import Checkpointer
  cfg = tiny.get_config()
  model = build_model(cfg.model)
  variables = quick_variables(model, seed=3)
  work = tmp_path_factory.mktemp("work")
  ckpt = Checkpointer(str(work / "checkpoints"), async_save=False)
  ckpt.save(7, {"step": np.int32(7), **variables})
  ckpt.wait()
  ckpt.close()
  out = work / "export"
  r = subprocess.run(
      [sys.executable, "-m", "maskrcnn_jax.export", "--config", "configs/tiny.py",
       "--workdir", str(work), "--out", str(out), "--platforms", "cpu,cuda,tpu"],
      cwd=common.REPO, env=common.env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return model, variables, out


def test_contract_names_every_file_and_platform(exported):
  _, variables, out = exported
  contract = json.loads((out / "serving.json").read_text())
  assert contract["platforms"] == ["cpu", "cuda", "tpu"]
  assert [a["canvas"] for a in contract["artifacts"]] == [[128, 128]]  # tiny: 96 / 128 px
  assert "step 7" in contract["description"]
  for a in contract["artifacts"]:
    program = jax.export.deserialize(bytearray((out / a["file"]).read_bytes()))
    assert program.platforms == ("cpu", "cuda", "tpu")
    assert program.in_avals[-3].shape[0] != 1  # the batch size is symbolic
  stored = np.load(out / "weights.npz")
  leaves = jax.tree_util.tree_leaves_with_path(variables)
  assert len(stored.files) == len(contract["weights"]["names"]) == len(leaves)
  assert set(contract["outputs"]) >= {"valid", "boxes", "scores", "labels", "masks"}
  # The weights are an input, not constants: each artifact is far smaller than the weights.
  weight_bytes = sum(np.asarray(v).nbytes for _, v in leaves)
  for a in contract["artifacts"]:
    assert (out / a["file"]).stat().st_size < weight_bytes


def test_fresh_process_serving_equals_predict(exported, tmp_path):
  model, variables, out = exported
  images = _images()
  expected = maskrcnn_jax.predict(model, variables, images, min_size=96, max_size=128,
                                  exact_padding=False)  # the canvas the export serves on
  assert sum(len(r["scores"]) for r in expected) > 0  # something to compare
  np.savez(tmp_path / "images.npz", *images)
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      from maskrcnn_jax import serving
      stored = np.load({str(tmp_path / 'images.npz')!r})
      images = [stored[f'arr_{{i}}'] for i in range(len(stored.files))]
      detector = serving.load({str(out)!r})
      one = detector(images)
      two = detector(images, batch_size=3)
      leaked = [m for m in sys.modules if m.startswith(('flax', 'maskrcnn_jax.modeling',
                                                        'maskrcnn_jax.training', 'torch'))]
      assert not leaked, leaked
      flat = {{}}
      for name, results in (('one', one), ('two', two)):
        for i, r in enumerate(results):
          for k, v in r.items():
            flat[f'{{name}}/{{i}}/{{k}}'] = v
      np.savez({str(tmp_path / 'served.npz')!r}, **flat)
      """)
  r = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=common.env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  served = np.load(tmp_path / "served.npz")
  for name in ("one", "two"):
    for i, want in enumerate(expected):
      got = {k.split("/")[2]: served[k] for k in served.files if k.startswith(f"{name}/{i}/")}
      assert sorted(got) == sorted(want)
      np.testing.assert_array_equal(got["labels"], want["labels"])
      np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
      np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
      np.testing.assert_allclose(got["masks"], want["masks"], atol=1e-4)
      assert got["masks"].shape[1:] == SIZES[i]


def test_serving_errors_are_clear(exported, tmp_path):
  from maskrcnn_jax import serving
  _, _, out = exported
  with pytest.raises(FileNotFoundError, match="serving.json"):
    serving.load(str(tmp_path))
  detector = serving.load(str(out))
  assert detector.canvas_for((32, 128)) == (128, 128)
  with pytest.raises(ValueError, match="no exported canvas"):  # larger than any canvas
    detector.canvas_for((160, 128))
  with pytest.raises(TypeError, match="uint8"):
    detector([np.zeros((64, 64, 3), np.float32)])
  contract = json.loads((out / "serving.json").read_text())
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "serving.json").write_text(json.dumps(dict(contract, version=99)))
  with pytest.raises(ValueError, match="version"):
    serving.load(str(bad))


def test_export_flags():
  assert export.parse_canvases("800x1344, 1344x800,800x1344") == ((800, 1344), (1344, 800))
  for text in ("800", "800x1000", "0x32", ""):
    with pytest.raises(ValueError):
      export.parse_canvases(text)
  assert export.parse_platforms("cpu,TPU") == ("cpu", "tpu")
  with pytest.raises(ValueError, match="subset"):
    export.parse_platforms("cpu,gpu")
  assert export.default_canvases(800, 1333) == ((896, 1408), (1408, 896))
  # Every image resized under 800 / 1333 and padded to 32 fits one of them.
  for h, w in [(480, 640), (640, 480), (1000, 1000), (100, 5000), (5000, 100)]:
    from maskrcnn_jax.data.preprocess import resized_size
    rh, rw = resized_size(h, w)
    ph, pw = -(-rh // 32) * 32, -(-rw // 32) * 32
    assert any(ch >= ph and cw >= pw for ch, cw in export.default_canvases(800, 1333))


def test_cli_errors_are_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "maskrcnn_jax.export", "--config", "configs/tiny.py",
                      "--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                     cwd=common.REPO, env=common.env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
  r = subprocess.run([sys.executable, "-m", "maskrcnn_jax.export", "--config", "configs/tiny.py",
                      "--workdir", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--canvases", "100x100"],
                     cwd=common.REPO, env=common.env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2 and "multiples of 32" in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "o")


def test_cli_unwritable_out_is_one_line(exported, tmp_path):
  """A loadable checkpoint (the fixture's workdir) and an --out under a regular file: one line,
  before any lowering."""
  work = exported[2].parent
  (tmp_path / "a_file").write_text("")
  r = subprocess.run([sys.executable, "-m", "maskrcnn_jax.export", "--config", "configs/tiny.py",
                      "--workdir", str(work), "--out", str(tmp_path / "a_file" / "o")],
                     cwd=common.REPO, env=common.env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2 and "cannot write to --out" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
