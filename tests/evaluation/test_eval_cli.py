"""eval.py end to end, as a user runs it: a trained workdir, one checkpoint folder, converted
torchvision weights, image files; and every bad input answered by one clear error line (or a
reported skip), never a traceback."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.training import common

# Every test here runs eval.py (and the module's fixture trains a workdir first).
pytestmark = pytest.mark.slow

NUM_VAL = 4  # common.make_config's shapes: 16 train, 4 val images of 64 x 64


def _write_config(path, cache, overrides=None, base="tests"):
  """A config file for eval.py: the tests' training config (or torchvision's R50-FPN with the
  tests' data) with `overrides`."""
  if base == "tests":
    body = f"  return make_config({cache!r}, {overrides or {}!r})\n"
  else:
    body = (f"  from configs import torchvision_r50_fpn\n"
            f"  c = torchvision_r50_fpn.get_config()\n"
            f"  c.data = make_config({cache!r}).data\n"
            f"  c.input.min_size, c.input.max_size = 256, 320  # R50 at 800 px costs a minute\n"
            f"  return c\n")
  path.write_text("from tests.training.common import make_config\n\n\ndef get_config():\n" + body)
  return str(path)


_ENV = {}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent jax compilation cache for this module's eval.py processes: the forward pass
  compiles once, not once per process."""
  path = str(tmp_path_factory.mktemp("jax_compilation_cache"))
  _ENV.update(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
  yield
  _ENV.clear()


def _eval_py(*args, timeout=600):
  return subprocess.run([sys.executable, "eval.py", *args], cwd=common.REPO,
                        env=common.env(**_ENV), capture_output=True, text=True, timeout=timeout)


def _ok(r):
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout


def _assert_metrics_equal_pycocotools(out_dir, cache, tasks):
  """metrics.json holds exactly `tasks` (and num_images, skipped), each with the 12 numbers that
  pycocotools' COCOeval computes itself from results.json against the dataset's own annotation
  file (the independent reference)."""
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
  assert sorted(k for k, v in metrics.items() if isinstance(v, dict)) == sorted(tasks)
  assert {"num_images", "skipped"} <= set(metrics)
  gt = COCO(os.path.join(cache, "annotations", "instances_val.json"))
  results = json.load(open(os.path.join(out_dir, "results.json")))
  for task in tasks:
    recs = [r for r in results if task == "bbox" or "segmentation" in r]
    if recs:
      dt = gt.loadRes(recs)
    else:  # loadRes refuses an empty list
      dt = COCO()
      dt.dataset = dict(images=gt.dataset["images"], categories=gt.dataset["categories"],
                        annotations=[])
      dt.createIndex()
    ev = COCOeval(gt, dt, task)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
             "ARl")
    np.testing.assert_allclose([metrics[task][n] for n in names], ev.stats, atol=1e-12,
                               err_msg=task)


def _clear_error(r, *needles):
  """Exit 2 and no traceback; the message is the line starting 'eval.py: error: ' (a config
  mismatch lists the arrays on the lines below it; TensorFlow may print notices above it)."""
  assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("eval.py: error: ")]
  assert len(errors) == 1, r.stderr
  for n in needles:
    assert n in errors[0], errors[0]
  assert "INFO" not in r.stderr and not any(l.startswith("I1") for l in r.stderr.splitlines())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained 2 steps (checkpoint at step 2) on the tests' shapes, and its config file."""
  from maskrcnn_jax.training import data_source, trainer
  root = tmp_path_factory.mktemp("eval_cli")
  cache = str(root / "shapes")
  config = common.make_config(cache, {"training.steps": 2, "training.checkpoint_every": 2})
  data_source.prepare_builder(config.data)
  trainer.train_and_evaluate(config, str(root / "work"))
  return dict(root=root, cache=cache, workdir=str(root / "work"),
              config=_write_config(root / "cfg.py", cache))


def test_workdir_evaluates_its_newest_checkpoint(trained):
  out = _ok(_eval_py("--config", trained["config"], "--workdir", trained["workdir"],
                     "--num_pictures", "2"))
  assert "at step 2" in out
  # One compilation for the whole split: all images share a bucket.
  assert f"compiled the forward pass 1 time(s) for {NUM_VAL} images" in out
  final = os.path.join(trained["workdir"], "eval", "final")
  metrics = json.load(open(os.path.join(final, "metrics.json")))
  for iou_type in ("bbox", "segm"):
    assert set(metrics[iou_type]["per_category"]) == {"circle", "square", "triangle"}
  _assert_metrics_equal_pycocotools(final, trained["cache"], ("bbox", "segm"))
  assert metrics["num_images"] == NUM_VAL
  results = json.load(open(os.path.join(final, "results.json")))
  assert isinstance(results, list)
  for r in results:
    assert r["category_id"] in (1, 2, 3) and set(r["segmentation"]) == {"size", "counts"}
  assert len(os.listdir(os.path.join(final, "pictures"))) == 2
  assert os.listdir(os.path.join(trained["workdir"], "tensorboard"))


def test_one_checkpoint_folder(trained, tmp_path):
  ckpt = os.path.join(trained["workdir"], "checkpoints", "2")
  out = _ok(_eval_py("--config", trained["config"], "--checkpoint", ckpt, "--out_dir",
                     str(tmp_path), "--num_pictures", "0"))
  assert "at step 2" in out
  assert json.load(open(tmp_path / "metrics.json"))["num_images"] == NUM_VAL


def test_checkpoint_of_another_config_is_refused(trained, tmp_path):
  other = _write_config(tmp_path / "other.py", trained["cache"], {"model.num_classes": 5})
  r = _eval_py("--config", other, "--workdir", trained["workdir"])
  _clear_error(r, "does not fit the config")
  assert "cls_score" in r.stderr  # the arrays that differ are named


@pytest.mark.parametrize("args, needle", [
    (["--workdir", "/nonexistent/run"], "does not exist"),
    (["--checkpoint", "/nonexistent/run/checkpoints/7"], "does not exist"),
    ([], "pass exactly one of"),
    (["--workdir", "WORK", "--checkpoint", "WORK/checkpoints/2"], "pass exactly one of"),
    (["--checkpoint", "WORK/checkpoints"], "not a checkpoint folder"),
    (["--checkpoint", "WORK/checkpoints/2/"], None),  # a trailing slash is fine: no error
    (["--checkpoint", "WORK/checkpoints/7"], "does not exist"),
    (["--torchvision_weights", "WORK/checkpoints/2/_CHECKPOINT_METADATA"],
     "cannot read"),  # not a torch file
    (["--workdir", "WORK", "--split", "test"], "'test' is not in the dataset"),
    (["--workdir", "WORK", "--split", "validation[:0]"], "has no images"),
])
def test_bad_arguments_are_one_clear_line(trained, args, needle, tmp_path):
  args = [a.replace("WORK", trained["workdir"]) for a in args]
  r = _eval_py("--config", trained["config"], *args, "--out_dir", str(tmp_path),
               "--num_pictures", "0")
  if needle is None:
    _ok(r)
  else:
    _clear_error(r, needle)


def test_checkpoint_outside_a_workdir(trained, tmp_path):
  """A checkpoint folder copied elsewhere: evaluated, written to --out_dir, no TensorBoard logs
  or eval/ folder created next to it; a step name orbax would not write is refused."""
  import shutil
  shutil.copytree(os.path.join(trained["workdir"], "checkpoints", "2"), tmp_path / "ckpts" / "2")
  out = _ok(_eval_py("--config", trained["config"], "--checkpoint", str(tmp_path / "ckpts" / "2"),
                     "--out_dir", str(tmp_path / "out"), "--num_pictures", "0"))
  assert "at step 2" in out
  assert sorted(os.listdir(tmp_path)) == ["ckpts", "out"]
  assert sorted(os.listdir(tmp_path / "ckpts")) == ["2"]
  shutil.copytree(tmp_path / "ckpts" / "2", tmp_path / "ckpts" / "007")
  _clear_error(_eval_py("--config", trained["config"], "--checkpoint",
                        str(tmp_path / "ckpts" / "007")), "not a checkpoint folder")


def test_workdir_without_checkpoints(trained, tmp_path):
  _clear_error(_eval_py("--config", trained["config"], "--workdir", str(tmp_path)),
               "has no checkpoints/ folder")
  (tmp_path / "checkpoints").mkdir()
  _clear_error(_eval_py("--config", trained["config"], "--workdir", str(tmp_path)),
               "holds no checkpoint yet")


def test_missing_and_unknown_config(trained):
  _clear_error(_eval_py("--config", "configs/nope.py", "--workdir", trained["workdir"]),
               "config file not found")
  _clear_error(_eval_py("--config", trained["config"], "--workdir", trained["workdir"],
                        "--config.model.no_such_field=1"), "unknown config field")


def test_image_files_with_an_undecodable_one(trained, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8)).save(
      images / "good.png")
  (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  (images / "notes.txt").write_text("not an image")
  out_dir = tmp_path / "out"
  out = _ok(_eval_py("--config", trained["config"], "--workdir", trained["workdir"],
                     "--images", str(images), "--out_dir", str(out_dir)))
  assert "skipped" in out and "broken.png" in out
  assert sorted(os.listdir(out_dir)) == ["good_pred.png", "predictions.json"]
  records = json.load(open(out_dir / "predictions.json"))
  assert all(r["file_name"].endswith("good.png") for r in records)
  w, h = Image.open(out_dir / "good_pred.png").size  # drawn larger when small, same aspect
  assert w >= 80 and w * 64 == h * 80

  only_broken = tmp_path / "broken_only"
  only_broken.mkdir()
  (only_broken / "broken.png").write_bytes(b"garbage")
  _clear_error(_eval_py("--config", trained["config"], "--workdir", trained["workdir"],
                        "--images", str(only_broken)), "none of the images could be decoded")


def test_truncated_image_in_a_dataset_is_reported_and_skipped(trained, tmp_path):
  from maskrcnn_jax.data import generate_shapes
  root = tmp_path / "coco"
  generate_shapes(str(root), num_train=0, num_val=3, seed=5, image_size=64)
  victim = root / "val" / "000001.png"
  victim.write_bytes(victim.read_bytes()[:60])  # a truncated file
  cfg = tmp_path / "coco_cfg.py"
  cfg.write_text(
      "from tests.training.common import make_config\n\n\ndef get_config():\n"
      f"  c = make_config({trained['cache']!r})\n"
      "  c.data.dataset = 'coco_format'\n"
      f"  c.data.root = {str(root)!r}\n"
      f"  c.data.tfds_dir = {str(tmp_path / 'tfds')!r}\n"
      "  return c\n")
  out = _ok(_eval_py("--config", str(cfg), "--workdir", trained["workdir"], "--out_dir",
                     str(tmp_path / "out"), "--num_pictures", "0"))
  assert "unreadable_image=1" in out
  assert json.load(open(tmp_path / "out" / "metrics.json"))["num_images"] == 2


@pytest.mark.slow
@pytest.mark.reference
def test_converted_torchvision_weights_on_the_shapes_split(trained, tmp_path):
  """torchvision's R50-FPN (random init, 91 classes) converted and evaluated on the shapes val
  split (at 256 px): it runs, writes the metrics pycocotools computes, compiles once for all
  images."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=91)
  weights = tmp_path / "tv.pth"
  torch.save(model.state_dict(), weights)
  cfg = _write_config(tmp_path / "tv_cfg.py", trained["cache"], base="torchvision")
  out = _ok(_eval_py("--config", cfg, "--torchvision_weights", str(weights), "--out_dir",
                     str(tmp_path / "out"), "--num_pictures", "1"))
  assert f"compiled the forward pass 1 time(s) for {NUM_VAL} images" in out
  metrics = json.load(open(tmp_path / "out" / "metrics.json"))
  assert metrics["num_images"] == NUM_VAL
  _assert_metrics_equal_pycocotools(tmp_path / "out", trained["cache"], ("bbox", "segm"))

  torch.save({"backbone.body.conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
  _clear_error(_eval_py("--config", cfg, "--torchvision_weights", str(tmp_path / "wrong.pth")),
               "--torchvision_weights")


@pytest.mark.slow
def test_faster_rcnn_trains_and_evaluates_bbox_only(trained, tmp_path):
  """`train.py --config configs/tiny.py --config.model.mask_on=False` (Faster R-CNN) trains, and
  eval.py writes metrics.json with bbox only, equal to pycocotools' own figures."""
  data = [f"--config.data.cache_dir={trained['cache']}", "--config.data.shapes.num_train=16",
          "--config.data.shapes.num_val=4", "--config.data.shapes.seed=1",
          "--config.data.shapes.image_size=64", "--config.data.image_size=(64, 64)"]
  work = str(tmp_path / "faster")
  r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", work,
                      "--config.model.mask_on=False", "--config.training.steps=3",
                      "--config.training.checkpoint_every=3", *data],
                     cwd=common.REPO, env=common.env(**_ENV), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "loss_box_reg" in r.stdout and "loss_mask" not in r.stdout
  out = _ok(_eval_py("--config", "configs/tiny.py", "--workdir", work,
                     "--config.model.mask_on=False", "--num_pictures", "1", *data))
  assert "at step 3" in out
  final = os.path.join(work, "eval", "final")
  _assert_metrics_equal_pycocotools(final, trained["cache"], ("bbox",))
  assert all("segmentation" not in rec
             for rec in json.load(open(os.path.join(final, "results.json"))))
