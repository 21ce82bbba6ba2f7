"""Data parallelism: 8 devices == 1 device on the same 8 images; a real two-process run."""
import json
import socket

import jax
import numpy as np
import pytest

from maskrcnn_jax.training import parallel
from tests.training import common


def test_example_keys_depend_on_global_index_only():
  """The sampling key of an example is a function of (rng, step, global index): how the batch
  is split over devices does not change it."""
  rng = jax.random.key_data(jax.random.key(5))
  whole = jax.random.key_data(parallel.example_keys(rng, 3, np.arange(8)))
  for per_device in (1, 2, 4):
    parts = [jax.random.key_data(parallel.example_keys(
        rng, 3, d * per_device + np.arange(per_device))) for d in range(8 // per_device)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
  other_step = jax.random.key_data(parallel.example_keys(rng, 4, np.arange(8)))
  assert not np.array_equal(other_step, whole)


# torchvision v2's norms: BatchNorm with batch statistics in the backbone, FPN and both heads,
# reduced over all devices (SyncBatchNorm), so they too must not depend on the split.
SYNC_BN = {"model.backbone.norm": "bn", "model.fpn.norm": "bn", "model.box_head.norm": "bn",
           "model.box_head.conv_layers": (32, 32), "model.box_head.fc_layers": (64,),
           "model.mask_head.norm": "bn"}


@pytest.mark.slow
def test_eight_devices_equal_one_device(shapes_cache, tmp_path):
  """Two steps (so schedule, momentum and sampling all take part) on a global batch of 8 images
  split over 8 devices give the parameters of the same two steps on 1 device. Both sides draw the
  same RoI/anchor samples because every example's sampling key is fold_in(fold_in(rng, step),
  global example index) (see `parallel.example_keys`).

  Frozen BN (v1): parameters equal to 1e-5. Synced batch-statistics BN (v2 norms): losses and the
  gradient norm equal to 1e-5 and running statistics to 1e-4; each tensor's update agrees to 1%
  (measured 2.8e-3 at 8 devices, 1.4e-3 at 4, 8e-4 at 2): BatchNorm's backward subtracts batch
  means, which amplifies the float rounding of sums split over devices on the few tensors whose
  gradient nearly cancels (a missing cross-device term would show in the losses and gradient
  norm, which agree to 2e-6)."""
  spec = dict(mode="dp_equivalence", cache_dir=shapes_cache, out=str(tmp_path / "dp"),
              overrides={"training.batch_size": 8, "training.frozen_stages": 1},
              variants=[{}, SYNC_BN])
  spec_path = tmp_path / "dp.json"
  spec_path.write_text(json.dumps(spec))
  p = common.start_worker(spec_path, num_devices=8)
  assert p.wait(timeout=900) == 0, common.log_tail(spec_path)
  with open(str(tmp_path / "dp") + ".json") as f:
    frozen_bn, sync_bn = json.load(f)
  for r in (frozen_bn, sync_bn):
    assert r["devices"] == [8, 1]
    for m8, m1 in zip(r["metrics_multi"], r["metrics_single"]):
      for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
    # Frozen stem and layer1 (frozen_stages=1) did not move; everything else did.
    assert r["frozen_changed"] == []
    assert len(r["changed"]) > 0
  assert frozen_bn["max_rel_param_diff"] <= 1e-5, frozen_bn
  assert frozen_bn["max_rel_update_diff"] <= 1e-3, frozen_bn  # the updates, not just the params
  assert frozen_bn["stats_changed"] == []
  assert sync_bn["max_rel_update_diff"] <= 1e-2, sync_bn
  assert sync_bn["max_rel_stats_diff"] <= 1e-4, sync_bn
  moved = set(sync_bn["stats_changed"])
  assert {"box_head/norm1/running_var", "backbone/layer2_0/bn1/running_mean",
          "mask_head/mask_norm1/running_mean"} <= moved
  assert not any(k.startswith(("backbone/bn1/", "backbone/layer1_")) for k in moved)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_identically(shapes_cache, tmp_path):
  """Two processes on localhost (jax.distributed, gloo, 1 CPU device each, each reading its own
  half of the data) train 3 steps in bfloat16 and end with identical parameters, saved once in
  the shared workdir."""
  port = _free_port()
  procs = []
  for pid in range(2):
    spec = dict(cache_dir=shapes_cache, workdir=str(tmp_path / "work"), out=str(tmp_path / "out"),
                overrides={"training.steps": 3, "training.batch_size": 2,
                           "model.dtype": "bfloat16",
                           "training.distributed.enabled": True,
                           "training.distributed.coordinator_address": f"127.0.0.1:{port}",
                           "training.distributed.num_processes": 2,
                           "training.distributed.process_id": pid})
    spec_path = tmp_path / f"p{pid}.json"
    spec_path.write_text(json.dumps(spec))
    procs.append((common.start_worker(spec_path, num_devices=1), spec_path))
  for p, spec_path in procs:
    assert p.wait(timeout=900) == 0, common.log_tail(spec_path)
  a, b = (np.load(tmp_path / f"out.{i}.npz") for i in range(2))
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    assert a[k].dtype == np.float32
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  ids = [open(tmp_path / f"out.{i}.ids").read().split("\n") for i in range(2)]
  seen = [set(int(x) for line in part if line for x in line.split()[1:]) for part in ids]
  assert seen[0] and seen[1] and not seen[0] & seen[1]  # each process reads its own shard
  assert sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir()) == ["3"]
  log0 = common.log_tail(procs[0][1], 100000)
  assert "over 2 device(s) and 2 process(es)" in log0
