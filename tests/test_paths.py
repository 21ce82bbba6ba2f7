"""Cloud workdirs (gs://...) are never turned into local paths: every path operation of training,
checkpointing and evaluation goes through `maskrcnn_jax.paths` (etils epath).

No cloud bucket is reachable here, so the operations run on TensorFlow's in-memory `ram://`
filesystem, made known to epath for the test exactly as it knows gs:// (through TF's gfile).
orbax's array writes go through tensorstore, which has no such filesystem; they are left out."""
import json
import os

import numpy as np
import pytest

from maskrcnn_jax import paths


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
  assert paths.join("gs://bucket/run", "eval", "final") == "gs://bucket/run/eval/final"
  assert paths.resolve("run") == str(tmp_path / "run")
  assert paths.resolve("~/run") == os.path.expanduser("~/run")
  assert paths.is_url("s3://b/x") and not paths.is_url("/tmp/x")


@pytest.fixture
def ram(monkeypatch, tmp_path):
  """epath learns ram:// (TF's in-memory filesystem) as it knows gs://; the test runs in an empty
  folder and checks that nothing local appears there."""
  from etils.epath import gpath, register
  monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("ram://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", gpath.backend_lib.tf_backend)
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
  monkeypatch.chdir(tmp_path)
  import tensorflow as tf
  root = f"ram://bucket-{os.getpid()}-{id(tmp_path)}"
  yield tf.io.gfile, root
  assert os.listdir(tmp_path) == [], "a URL was turned into a local path"


def test_path_operations_on_a_url(ram):
  gfile, root = ram
  p = paths.as_path(f"{root}/run")
  assert os.fspath(p) == f"{root}/run"
  p.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(paths.join(f"{root}/run", "a.json"), "{}")
  assert gfile.exists(f"{root}/run/a.json") and not gfile.exists(f"{root}/run/a.json.tmp")
  assert [c.name for c in p.iterdir()] == ["a.json"]


def test_trainer_config_checkpointer_and_evaluation_outputs_on_a_url(ram):
  gfile, root = ram
  from configs import tiny
  from maskrcnn_jax.evaluation import coco_eval
  from maskrcnn_jax.training import checkpoint, trainer
  work = f"{root}/work"
  paths.as_path(work).mkdir(parents=True)
  c = tiny.get_config()
  trainer._write_config(c, work)
  assert json.loads(gfile.GFile(f"{work}/config.json").read())["training"]["steps"] == \
      c.training.steps
  c.training.steps = 7
  trainer._write_config(c, work)  # a resumed run reads the old one and rewrites it
  assert json.loads(gfile.GFile(f"{work}/config.json").read())["training"]["steps"] == 7
  gfile.makedirs(f"{work}/checkpoints/5.orbax-checkpoint-tmp-1")
  ckpt = checkpoint.Checkpointer(paths.join(work, "checkpoints"), async_save=False)
  assert ckpt.directory == f"{work}/checkpoints" and ckpt.path(5) == f"{work}/checkpoints/5"
  assert ckpt.latest_step() is None
  ckpt.close()
  out = paths.join(work, "eval", "final")
  paths.as_path(out).mkdir(parents=True)
  coco_eval.save_results(paths.join(out, "results.json"), [dict(image_id=1, score=0.5)])
  assert json.loads(gfile.GFile(f"{out}/results.json").read())[0]["score"] == 0.5


def test_images_export_and_train_py_workdir_check_on_a_url(ram, monkeypatch):
  gfile, root = ram
  paths.check_writable(f"{root}/new/run")  # train.py's --workdir check
  assert gfile.isdir(f"{root}/new/run") and gfile.listdir(f"{root}/new/run") == []
  from maskrcnn_jax.evaluation import images
  fake = [dict(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32),
               labels=np.zeros(0, np.int32))]
  monkeypatch.setattr(images, "predict", lambda *a, **k: fake)
  images.export_predictions(None, None, [np.zeros((8, 8, 3), np.uint8)], ["dir/a.jpg"],
                            f"{root}/pred", class_names=["bg", "x"])
  assert sorted(gfile.listdir(f"{root}/pred")) == ["a_pred.png", "predictions.json"]
