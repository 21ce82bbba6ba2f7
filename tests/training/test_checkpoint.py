"""Checkpointer on a small TrainState: round trip, keep-last-N, corrupt, partial, mismatched."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskrcnn_jax.training import checkpoint as ckpt_lib, parallel
from maskrcnn_jax.training.train_state import TrainState

# After a failed restore (the corrupted-checkpoint tests) orbax leaves pending tensorstore reads to
# the garbage collector, which reports each one later; harmless.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Exception ignored in.*_read_array_index_and_device_put"
                               ":pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:Exception ignored in. None"
                               ":pytest.PytestUnraisableExceptionWarning")]


def _state(step, width=4):
  params = {"backbone": {"conv1": {"kernel": jnp.full((3, 3, 3, width), float(step))}},
            "box_head": {"fc6": {"kernel": jnp.arange(200.0 * width).reshape(200, width) + step,
                                 "bias": jnp.ones((width,))}}}
  tx = optax.sgd(0.1, momentum=0.9)
  return TrainState.create({"params": params, "batch_stats": {"m": jnp.zeros(3)}}, tx,
                           seed=7).replace(step=jnp.int32(step))


def _abstract(state):
  mesh = parallel.make_mesh()
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=parallel.replicated(mesh)), state)


def _save(directory, steps, keep=3):
  c = ckpt_lib.Checkpointer(directory, keep=keep)
  for s in steps:
    assert c.save(s, _state(s))
  c.close()


def _largest_file(path):
  files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
  return max(files, key=os.path.getsize)


def test_round_trip_and_keep_last(tmp_path):
  d = str(tmp_path / "checkpoints")
  _save(d, [1, 2, 3, 4], keep=2)
  c = ckpt_lib.Checkpointer(d, keep=2)
  assert c.steps() == [3, 4]
  state, step = c.restore_latest(_abstract(_state(0)))
  c.close()
  assert step == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(4))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert state.rng.dtype == jnp.uint32


def test_empty_directory_restores_nothing(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  assert c.restore_latest(_abstract(_state(0))) == (None, None)
  c.close()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupted_newest_falls_back_to_previous(tmp_path, caplog, damage):
  d = str(tmp_path / "checkpoints")
  _save(d, [3, 6])
  victim = _largest_file(os.path.join(d, "6"))
  if damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  else:
    os.remove(victim)
  c = ckpt_lib.Checkpointer(d)
  with caplog.at_level(logging.WARNING):
    state, step = c.restore_latest(_abstract(_state(0)))
  assert step == 3 and int(np.asarray(state.step)) == 3
  np.testing.assert_array_equal(np.asarray(state.params["box_head"]["fc6"]["kernel"]),
                                np.asarray(_state(3).params["box_head"]["fc6"]["kernel"]))
  assert any(os.path.join(d, "6") in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records)
  # The bad one is moved aside, so the resumed run can write step 6 again.
  assert c.steps() == [3]
  assert os.listdir(str(tmp_path / "checkpoints_corrupt"))[0].startswith("6-")
  assert c.save(6, _state(6))
  c.close()


def test_read_only_restore_changes_nothing(tmp_path):
  """Evaluation opens checkpoints read-only: a corrupt newest one is skipped, not moved, and
  nothing is created or cleaned up."""
  d = str(tmp_path / "checkpoints")
  _save(d, [3, 6])
  victim = _largest_file(os.path.join(d, "6"))
  os.remove(victim)
  partial = os.path.join(d, "9.orbax-checkpoint-tmp-1234567")
  os.makedirs(partial)
  before = sorted(os.listdir(d))
  c = ckpt_lib.Checkpointer(d, read_only=True)
  state, step = c.restore_latest(_abstract(_state(0)))
  assert step == 3 and int(np.asarray(state.step)) == 3
  state = c.restore(3, _abstract(_state(0)))
  assert int(np.asarray(state.step)) == 3
  with pytest.raises(RuntimeError, match="unreadable"):
    c.restore(6, _abstract(_state(0)))
  with pytest.raises(FileNotFoundError, match="steps here"):
    c.restore(4, _abstract(_state(0)))
  c.close()
  assert sorted(os.listdir(d)) == before
  assert not os.path.exists(str(tmp_path / "checkpoints_corrupt"))
  missing = ckpt_lib.Checkpointer(str(tmp_path / "nope"), read_only=True)
  assert missing.restore_latest(_abstract(_state(0))) == (None, None)
  missing.close()
  assert not os.path.exists(str(tmp_path / "nope"))  # not created


def test_partial_save_is_ignored(tmp_path, caplog):
  d = str(tmp_path / "checkpoints")
  _save(d, [3])
  partial = os.path.join(d, "6.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "default"))
  with caplog.at_level(logging.WARNING):
    c = ckpt_lib.Checkpointer(d)
    state, step = c.restore_latest(_abstract(_state(0)))
  c.close()
  assert step == 3
  assert any("6.orbax-checkpoint-tmp-1234567" in r.getMessage() for r in caplog.records)


def test_all_corrupted_is_an_error(tmp_path):
  d = str(tmp_path / "checkpoints")
  _save(d, [3, 6])
  for s in (3, 6):
    os.remove(_largest_file(os.path.join(d, str(s))))
  c = ckpt_lib.Checkpointer(d)
  with pytest.raises(RuntimeError, match="no readable checkpoint"):
    c.restore_latest(_abstract(_state(0)))
  c.close()


def test_shape_mismatch_is_refused(tmp_path):
  d = str(tmp_path / "checkpoints")
  _save(d, [3])
  c = ckpt_lib.Checkpointer(d)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    c.restore_latest(_abstract(_state(0, width=5)))
  c.close()
  msg = str(e.value)
  assert "params.box_head.fc6.kernel: checkpoint (200, 4) vs config (200, 5)" in msg
  assert "--workdir" in msg
  assert os.path.isdir(os.path.join(d, "3"))  # nothing moved: the checkpoint is fine
