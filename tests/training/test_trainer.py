"""train_and_evaluate end to end on the tiny config: resume after SIGTERM / SIGKILL / corruption
equals an uninterrupted run, non-finite guard, overfitting, bfloat16, outputs."""
import glob
import json
import logging
import os
import shutil
import signal

import numpy as np
import pytest

from maskrcnn_jax.training import checkpoint as ckpt_lib, data_source, trainer
from tests.training import common

# After a failed restore (the corrupted-checkpoint tests) orbax leaves pending tensorstore reads to
# the garbage collector, which reports each one later; harmless.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Exception ignored in.*_read_array_index_and_device_put"
                               ":pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:Exception ignored in. None"
                               ":pytest.PytestUnraisableExceptionWarning")]


def _run(cache, workdir, overrides=None, hooks=(), evaluate=None):
  """In-process run; returns (final params, {step: image ids}, [metrics per step])."""
  ids, metrics = {}, []

  def record(step, state, m, batch):
    ids[step] = [int(i) for i in batch["image_id"]]
    metrics.append(m)
  state = trainer.train_and_evaluate(common.make_config(cache, overrides), str(workdir),
                                     hooks=[record, *hooks], evaluate=evaluate)
  return common.flat_params(state), ids, metrics


def _assert_same_params(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def straight(shapes_cache, tmp_path_factory):
  """6 uninterrupted steps, checkpoints at 3 and 6, an evaluation callback at 3 and 6."""
  workdir = tmp_path_factory.mktemp("straight")
  evaluations = []

  def evaluate(step, model, variables, builder, workdir):
    evaluations.append((step, sorted(variables), builder.info.splits["validation"].num_examples))
    return {"segm_ap": step / 10}
  params, ids, metrics = _run(shapes_cache, workdir, {"training.eval_every": 3},
                              evaluate=evaluate)
  return dict(workdir=str(workdir), params=params, ids=ids, metrics=metrics,
              evaluations=evaluations)


def test_outputs_config_tensorboard_checkpoints(straight):
  w = straight["workdir"]
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["3", "6"]
  with open(os.path.join(w, "config.json")) as f:
    assert json.load(f)["training"]["steps"] == 6
  events = glob.glob(os.path.join(w, "tensorboard", "events.out.tfevents.*"))
  assert events
  import tensorflow as tf
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events[0]) for v in e.summary.value}
  assert {"train/loss", "train/loss_mask", "train/grad_norm", "train/learning_rate",
          "eval/segm_ap"} <= tags
  assert straight["evaluations"] == [(3, ["batch_stats", "params"], 4),
                                     (6, ["batch_stats", "params"], 4)]
  assert sorted(straight["ids"]) == [1, 2, 3, 4, 5, 6]
  for m in straight["metrics"]:
    assert set(m) >= {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                      "loss_mask", "loss", "grad_norm", "learning_rate"}
    assert all(np.isfinite(v) for v in m.values())


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill_matches_uninterrupted(straight, shapes_cache,
                                                                tmp_path):
  """SIGTERM at step 3 (no periodic checkpoint): the process saves step 3 and exits 0. SIGKILL at
  step 5, after the step-3 checkpoint was written: the process dies. Resuming either for the
  remaining steps gives the uninterrupted run's parameters and batches, bit for bit."""
  runs = {
      "term": dict(sigterm_at=3, overrides={"training.checkpoint_every": 0}),
      "kill": dict(sigkill_at=5, sigkill_after_checkpoint=3, overrides={}),
  }
  procs = {}
  for name, extra in runs.items():
    spec = dict(cache_dir=shapes_cache, workdir=str(tmp_path / name),
                out=str(tmp_path / f"{name}_out"), **extra)
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    procs[name] = (common.start_worker(spec_path), spec_path)
  for name, (p, spec_path) in procs.items():
    p.wait(timeout=600)
  (term, term_spec), (kill, kill_spec) = procs["term"], procs["kill"]
  assert term.returncode == 0, common.log_tail(term_spec)
  assert "preempted (SIGTERM): saved step 3" in common.log_tail(term_spec, 100000)
  assert sorted(os.listdir(tmp_path / "term" / "checkpoints")) == ["3"]
  assert kill.returncode == -signal.SIGKILL, common.log_tail(kill_spec)
  assert "3" in os.listdir(tmp_path / "kill" / "checkpoints")
  assert "6" not in os.listdir(tmp_path / "kill" / "checkpoints")

  for name in runs:
    with open(tmp_path / f"{name}_out.0.ids") as f:
      first = {int(l.split()[0]): [int(x) for x in l.split()[1:]] for l in f}
    params, ids, _ = _run(shapes_cache, tmp_path / name)
    assert sorted(ids) == [4, 5, 6], name  # resumed at step 3 both times
    assert {s: first[s] for s in (1, 2, 3)} == {s: straight["ids"][s] for s in (1, 2, 3)}
    assert ids == {s: straight["ids"][s] for s in (4, 5, 6)}, name
    _assert_same_params(params, straight["params"])


def test_corrupted_newest_checkpoint_resumes_from_previous(straight, shapes_cache, tmp_path,
                                                           caplog):
  workdir = tmp_path / "work"
  shutil.copytree(straight["workdir"], workdir)
  ck6 = workdir / "checkpoints" / "6"
  files = [os.path.join(r, f) for r, _, fs in os.walk(ck6) for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)
  with caplog.at_level(logging.WARNING):
    params, ids, _ = _run(shapes_cache, workdir)
  assert any(str(ck6) in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records)
  assert sorted(ids) == [4, 5, 6]
  _assert_same_params(params, straight["params"])


def test_finished_run_is_not_retrained(straight, shapes_cache, tmp_path):
  workdir = tmp_path / "work"
  shutil.copytree(straight["workdir"], workdir)
  params, ids, _ = _run(shapes_cache, workdir)
  assert ids == {}
  _assert_same_params(params, straight["params"])


def test_checkpoint_of_another_model_is_refused(straight, shapes_cache, tmp_path):
  workdir = tmp_path / "work"
  shutil.copytree(straight["workdir"], workdir)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="cls_score"):
    trainer.train_and_evaluate(
        common.make_config(shapes_cache, {"model.num_classes": 5}), str(workdir))


def test_non_finite_loss_raises_and_is_not_saved(shapes_cache, tmp_path, monkeypatch):
  """A NaN image at the third batch: the error names step 3 and the losses; only the step-2
  checkpoint exists."""
  real = data_source.train_iterator

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 2:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch
  monkeypatch.setattr(data_source, "train_iterator", poisoned)
  with pytest.raises(trainer.NonFiniteError) as e:
    _run(shapes_cache, tmp_path, {"training.checkpoint_every": 2})
  msg = str(e.value)
  assert "at step 3:" in msg and "loss_objectness=nan" in msg and "grad_norm=nan" in msg
  assert "last good checkpoint is step 2" in msg
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_check_finite_names_offending_values():
  trainer.check_finite({"loss": 1.0, "grad_norm": 2.0, "num_fg_rois": float("nan")}, 7)
  with pytest.raises(trainer.NonFiniteError, match=r"step 7: grad_norm=inf, loss_mask=nan"):
    trainer.check_finite({"loss_mask": float("nan"), "grad_norm": float("inf"), "loss": 1.0}, 7)


@pytest.mark.slow
def test_bfloat16_step_runs(shapes_cache, tmp_path):
  params, _, metrics = _run(shapes_cache, tmp_path, {"model.dtype": "bfloat16",
                                                     "training.steps": 2,
                                                     "training.checkpoint_every": 0})
  assert all(v.dtype == np.float32 for v in params.values())
  assert all(np.isfinite(v) for m in metrics for v in m.values())
  assert metrics[-1]["loss"] > 0


@pytest.mark.slow
def test_tiny_config_overfits_four_images(tmp_path_factory):
  """The total loss on 4 images (at most 2 objects each, no flips) falls by more than 90%."""
  cache = str(tmp_path_factory.mktemp("four") / "shapes")
  _, _, metrics = _run(cache, tmp_path_factory.mktemp("overfit"), {
      "data.shapes.num_train": 4, "data.shapes.max_objects": 2, "data.flip_prob": 0.0,
      "training.batch_size": 4, "training.steps": 250, "training.learning_rate": 0.05,
      "training.schedule": "step",
      "training.warmup_steps": 5, "training.decay_steps": (), "training.weight_decay": 0.0,
      "training.checkpoint_every": 0, "training.log_every": 20})
  first = metrics[0]["loss"]
  last = np.mean([m["loss"] for m in metrics[-5:]])
  assert last < 0.1 * first, (first, last)


def test_unknown_training_and_data_keys_are_errors(shapes_cache):
  from maskrcnn_jax.training.errors import ConfigError
  c = common.make_config(shapes_cache)
  c.training.lr = 0.1
  with pytest.raises(ConfigError, match=r"config.training has unknown keys \['lr'\]"):
    trainer.validate_config(c)
  c = common.make_config(shapes_cache)
  c.data.shapes.num_images = 3
  with pytest.raises(ConfigError, match="config.data.shapes has unknown keys"):
    trainer.validate_config(c)
  trainer.validate_config(common.make_config(shapes_cache))
