"""Subprocess side of the training tests: `python -m tests.training.worker SPEC.json`.

SPEC keys:
  mode: 'train' (default) or 'dp_equivalence'.
  cache_dir, overrides: passed to `common.make_config`.
  workdir: the run's workdir ('train').
  out: where results go: OUT.<process>.npz (final params) and OUT.<process>.ids (image ids per
    step, one line per step) for 'train'; OUT.json for 'dp_equivalence'.
  sigterm_at: send SIGTERM to itself after this step (the trainer must save and return).
  sigkill_at, sigkill_after_checkpoint: at step sigkill_at, wait until the checkpoint of step
    sigkill_after_checkpoint is complete on disk, then SIGKILL itself.
"""
import json
import os
import signal
import sys
import time

import numpy as np


def _train(spec):
  import jax

  from maskrcnn_jax.training import trainer
  from tests.training.common import flat_params, make_config

  config = make_config(spec["cache_dir"], spec.get("overrides"))
  out = spec["out"]
  hooks = []
  def record(step, state, metrics, batch):
    # (jax.process_index() only here: nothing may touch jax before the trainer's
    # jax.distributed.initialize.)
    with open(f"{out}.{jax.process_index()}.ids", "a") as f:
      f.write(f"{step} " + " ".join(str(int(i)) for i in batch["image_id"]) + "\n")
  hooks.append(record)

  if spec.get("sigterm_at"):
    def term(step, state, metrics, batch):
      if step == spec["sigterm_at"]:
        os.kill(os.getpid(), signal.SIGTERM)
    hooks.append(term)
  if spec.get("sigkill_at"):
    def kill(step, state, metrics, batch):
      if step == spec["sigkill_at"]:
        done = os.path.join(spec["workdir"], "checkpoints",
                            str(spec["sigkill_after_checkpoint"]), "commit_success.txt")
        deadline = time.time() + 60
        while not os.path.exists(done) and time.time() < deadline:
          time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    hooks.append(kill)

  state = trainer.train_and_evaluate(config, spec["workdir"], hooks=hooks)
  np.savez(f"{out}.{jax.process_index()}.npz", **flat_params(state))
  print("worker finished at step", int(np.asarray(state.step.addressable_data(0))), flush=True)


def _dp_equivalence(spec):
  """For each of spec['variants'] (override dicts, applied over spec['overrides']): two steps on
  all (8) devices vs the same two steps on device 0 alone, same state, same 8 images. Writes a list
  of comparisons (one per variant) to OUT.json."""
  from tests.training.common import make_config
  out = [_dp_compare(make_config(spec["cache_dir"], {**spec.get("overrides", {}), **variant}))
         for variant in spec.get("variants", [{}])]
  with open(spec["out"] + ".json", "w") as f:
    json.dump(out, f)


def _dp_compare(config):
  import jax
  from flax import traverse_util

  from maskrcnn_jax.modeling.builder import build_model
  from maskrcnn_jax.training import data_source, initialization, optimizer, parallel
  from maskrcnn_jax.training.train_state import TrainState
  from tests.training.common import flat_params

  flat = lambda tree: {"/".join(k): np.asarray(v)
                       for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}
  t = config.training
  n = jax.device_count()
  model = build_model(config.model, frozen_stages=t.frozen_stages)
  variables = initialization.random_variables(model, 0)
  tx = optimizer.make_optimizer(t, variables["params"])
  host_state = jax.device_get(TrainState.create(variables, tx, seed=3))
  builder = data_source.prepare_builder(config.data)
  batch = next(data_source.train_iterator(builder, config.data, n, 0, 0))
  # A nonzero step, so that the schedule, the momentum and the RNG all take part: 2 steps each.
  results = {}
  for name, devices in (("multi", jax.devices()), ("single", jax.devices()[:1])):
    mesh = parallel.make_mesh(devices)
    step = parallel.make_parallel_step(
        parallel.make_train_step(model, tx, optimizer.learning_rate_schedule(t),
                                 optimizer.trainable_mask(variables["params"], t.frozen_stages)),
        mesh)
    state = parallel.replicate(host_state, mesh)
    metrics = []
    for _ in range(2):
      state, m = step(state, parallel.global_batch(batch, mesh, model.batch_keys))
      metrics.append({k: float(v) for k, v in parallel.to_host(m).items()})
    results[name] = (flat_params(state), metrics, len(devices),
                     flat(parallel.to_host(state.batch_stats)))
  p_multi, p_single = results["multi"][0], results["single"][0]
  p0 = flat(variables["params"])
  labels = {"/".join(k): v for k, v in traverse_util.flatten_dict(
      optimizer.trainable_labels(variables["params"], t.frozen_stages)).items()}
  param_diff, update_diff = {}, {}
  for k in p_multi:
    a, b = p_multi[k].astype(np.float64), p_single[k].astype(np.float64)
    param_diff[k] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3)))
    da, db = a - p0[k], b - p0[k]
    update_diff[k] = float(np.linalg.norm(da - db) / max(np.linalg.norm(db), 1e-12))
  s_multi, s_single = results["multi"][3], results["single"][3]
  s0 = flat(variables["batch_stats"])
  stats_diff = {k: float(np.max(np.abs(s_multi[k] - s_single[k]) /
                                np.maximum(np.abs(s_single[k]), 1e-3))) for k in s_single}
  return dict(devices=[results["multi"][2], results["single"][2]],
              max_rel_param_diff=max(param_diff.values()),
              max_rel_update_diff=max(update_diff.values()),
              max_rel_stats_diff=max(stats_diff.values(), default=0.0),
              worst=sorted(update_diff, key=update_diff.get)[-3:],
              metrics_multi=results["multi"][1], metrics_single=results["single"][1],
              frozen_changed=[k for k in p_multi if labels[k] == optimizer.FROZEN
                              and not np.array_equal(p_multi[k], p0[k])],
              changed=[k for k in p_multi if not np.array_equal(p_multi[k], p0[k])],
              stats_changed=[k for k in s_single if not np.array_equal(s_single[k], s0[k])])


def main():
  with open(sys.argv[1]) as f:
    spec = json.load(f)
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  if spec.get("mode", "train") == "dp_equivalence":
    _dp_equivalence(spec)
  else:
    _train(spec)


if __name__ == "__main__":
  main()
