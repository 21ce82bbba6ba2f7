"""The ablation runner: every row's config builds, runs are resumed and shared between tables, and
the table's statistics and the paper-ordering verdicts (ties within the spread) are right."""
import importlib
import json
import os
import sys
import time

import pytest
from absl import app

from maskrcnn_jax.experiments import ablate
from maskrcnn_jax.modeling.builder import build_model


@pytest.mark.parametrize("config", sorted({r.config for t in ablate.TABLES.values()
                                           for r in t.rows}))
def test_every_row_config_builds(config):
  c = importlib.import_module(f"configs.ablations.{config}").get_config()
  model = build_model(c.model)
  assert c.data.shapes.min_visible_fraction == 0.1
  assert c.training.steps == 1500
  assert model.levels == ((4,) if "c4" in config else (2, 3, 4, 5, 6))


@pytest.fixture
def flags(tmp_path):
  """Sets the runner's flags for one test (restored after it); records go to tmp_path/records."""
  from absl.testing import flagsaver
  if not ablate.FLAGS.is_parsed():
    ablate.FLAGS(["ablate"])
  saver = flagsaver.flagsaver()
  saver.__enter__()
  ablate.FLAGS.record_dir = str(tmp_path / "records")

  def set_flags(**values):
    for k, v in values.items():
      setattr(ablate.FLAGS, k, v)
  yield set_flags
  saver.__exit__(None, None, None)


def _fake_runs(monkeypatch, aps, stop_at=None):
  """_subprocess stand-in: train.py writes config.json and a checkpoint (at `stop_at[config]` if
  given: an interrupted run), eval.py writes metrics.json with the next mask AP of
  `aps[config]`."""
  calls = []

  def fake(cmd, log, add_seconds):
    calls.append(cmd)
    add_seconds(60.0)
    rdir = cmd[cmd.index("--workdir") + 1]
    config = os.path.basename(os.path.dirname(rdir))
    if cmd[1] == "train.py":
      step = (stop_at or {}).get(config, 1500)
      os.makedirs(os.path.join(rdir, "checkpoints", str(step)), exist_ok=True)
      with open(os.path.join(rdir, "config.json"), "w") as f:
        json.dump({"training": {"steps": 1500}}, f)
    else:
      ap = aps[config][int(rdir.rsplit("_", 1)[1])]
      os.makedirs(os.path.dirname(ablate.metrics_path(rdir)), exist_ok=True)
      with open(ablate.metrics_path(rdir), "w") as f:
        json.dump({"segm": {"AP": ap, "AP50": ap + 0.2, "AP75": ap},
                   "bbox": {"AP": ap + 0.05, "AP50": 0.9, "AP75": 0.8}}, f)
  monkeypatch.setattr(ablate, "_subprocess", fake)
  return calls


def test_runner_resumes_shares_rows_and_reports(tmp_path, monkeypatch, capsys, flags):
  aps = {"r50_fpn": [0.30, 0.32], "fpn_maskiou": [0.36, 0.37], "fpn_mlp2": [0.20, 0.30],
         "fpn_mlp3": [0.25, 0.35]}
  calls = _fake_runs(monkeypatch, aps)
  flags(workdir=str(tmp_path), table="ms,2e", seeds=2, max_runs=3, override=[])
  ablate.main(["ablate"])
  assert len(calls) == 6  # three runs (train + eval each), the rest left for later
  out = capsys.readouterr().out
  assert "left for a later sitting" in out
  first = calls[0]
  assert first[1] == "train.py" and "--config.training.seed=0" in first
  assert "--config.data.seed=0" in first
  # Only started runs hold settings: the ones left for later can still change them.
  assert not (tmp_path / "fpn_mlp2").exists()
  flags(max_runs=0)
  ablate.main(["ablate"])
  # r50_fpn is in both tables: 4 configs x 2 seeds = 8 runs in all, none trained twice.
  assert len(calls) == 16
  out = capsys.readouterr().out
  assert out.count("done earlier") == 3
  table = (tmp_path / "table_ms.md").read_text()
  assert "| Mask R-CNN | 34.2 | 31.0 ± 1.0 |" in table
  assert "| + MaskIoU head | 35.6 | 36.5 ± 0.5 |" in table
  assert "+5.5 (spread 2.0): agrees" in table
  table_2e = (tmp_path / "table_2e.md").read_text()
  # MLP 1024-1024-1024 30 +- 5 vs FCN 31 +- 1: within the spread of 10 -> a tie, not a ranking.
  assert "FCN - MLP fc 1024-1024-1024: +1.0 (spread 10.0): tie (difference within" in table_2e
  assert "equal in the paper; a tie here" in table_2e
  assert (tmp_path / "table_ms.png").exists()
  assert "Every run trained at commit" in table
  run_json = tmp_path / "fpn_maskiou" / "seed_1" / "run.json"  # one run from another commit
  run_json.write_text(json.dumps(dict(json.loads(run_json.read_text()), commit="deadbeef" * 5)))
  flags(report_only=True)
  ablate.main(["ablate"])
  assert "trained at 2 commits (" in (tmp_path / "table_ms.md").read_text()
  assert "deadbee" in (tmp_path / "table_ms.md").read_text()
  flags(report_only=False)
  flags(override=["training.steps=10"])
  with pytest.raises(app.UsageError, match="overrides differ"):
    ablate.main(["ablate"])
  flags(override=[], report_only=True)
  edited = lambda config, seed: {"training": {"steps": 1000}}  # a config file changed
  monkeypatch.setattr(ablate, "expected_config", edited)
  with pytest.raises(app.UsageError, match=r"another config \(training.steps: 1500 -> 1000"):
    ablate.main(["ablate"])


def test_records_outlive_the_workdir(tmp_path, monkeypatch, capsys, flags):
  """Finished runs are recorded; a fresh workdir trains none of them again and prints the same
  table; a record whose config no longer holds is stale and its run is trained again; a key added
  to the config since is accepted."""
  aps = {"r50_fpn": [0.30, 0.32], "fpn_maskiou": [0.36, 0.37]}
  calls = _fake_runs(monkeypatch, aps)
  flags(workdir=str(tmp_path / "a"), table="ms", seeds=2, max_runs=0, override=[])
  ablate.main(["ablate"])
  assert len(calls) == 8
  rec = json.loads((tmp_path / "records" / "fpn_maskiou" / "seed_1.json").read_text())
  assert rec["metrics"]["segm"]["AP"] == 0.37 and rec["train_s"] == 60.0
  assert rec["resolved_config"] == {"training": {"steps": 1500}} and rec["seed"] == 1
  table = (tmp_path / "a" / "table_ms.md").read_text()
  capsys.readouterr()
  flags(workdir=str(tmp_path / "b"))
  ablate.main(["ablate"])
  assert len(calls) == 8 and capsys.readouterr().out.count("done earlier") == 4
  assert (tmp_path / "b" / "table_ms.md").read_text() == table
  real = ablate.expected_config

  def edited(config, seed):  # r50_fpn trained for fewer steps now; a new key everywhere
    c = real(config, seed)
    c["model"]["a_new_switch"] = "off"
    if config == "r50_fpn":
      c["training"]["steps"] = 1000
    return c
  monkeypatch.setattr(ablate, "expected_config", edited)
  flags(workdir=str(tmp_path / "c"))
  ablate.main(["ablate"])
  out = capsys.readouterr().out
  assert "r50_fpn/seed_0.json is stale (the config changed since: training.steps: 1500 -> 1000" \
      in out
  assert len(calls) == 12 and {c[c.index("--workdir") + 1] for c in calls[8:]} == {
      str(tmp_path / "c" / "r50_fpn" / f"seed_{s}") for s in (0, 1)}


def test_interrupted_and_single_seed_runs(tmp_path, monkeypatch, capsys, flags):
  """A training that stopped early (train.py exits 0 after SIGTERM) is not evaluated, reported
  as failed, and the sitting goes on; one seed gives numbers but no verdict."""
  calls = _fake_runs(monkeypatch, {"r50_fpn": [0.3], "fpn_maskiou": [0.4]},
                     stop_at={"r50_fpn": 750})
  flags(workdir=str(tmp_path), table="ms", seeds=1, max_runs=0, override=[], report_only=False)
  ablate.main(["ablate"])
  out = capsys.readouterr().out
  assert "FAILED" in out and "stopped at step 750 of 1500" in out
  assert [c[1] for c in calls] == ["train.py", "train.py", "eval.py"]
  assert ablate.load_run(str(tmp_path), "r50_fpn", 0) is None
  assert ablate.load_run(str(tmp_path), "fpn_maskiou", 0) is not None
  _fake_runs(monkeypatch, {"r50_fpn": [0.3], "fpn_maskiou": [0.4]})
  ablate.main(["ablate"])
  table = (tmp_path / "table_ms.md").read_text()
  assert "no verdict before two seeds per row" in table


def test_unknown_table():
  with pytest.raises(app.UsageError, match="unknown"):
    ablate.tables_from_flag("2d")


def test_subprocess_counts_time_as_it_passes(tmp_path):
  """A run's wall time reaches its counter while it runs (a runner killed mid-run keeps it), the
  ticks add up to the run's wall time, and a failing command raises with the end of its log."""
  ticks = []
  start = time.time()
  ablate._subprocess([sys.executable, "-c", "import time; print('hi'); time.sleep(1.0)"],
                     str(tmp_path / "log"), ticks.append, every=0.2)
  wall = time.time() - start
  assert len(ticks) >= 3 and 1.0 <= sum(ticks) <= wall
  assert "hi" in (tmp_path / "log").read_text()
  with pytest.raises(RuntimeError, match=r"(?s)failed \(exit 3\).*boom"):
    ablate._subprocess([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                       str(tmp_path / "log2"), ticks.append)


def test_subprocess_stops_its_command_when_interrupted(tmp_path):
  """An exception in the runner (Ctrl-C, here from the time counter) sends the command SIGTERM
  (train.py then saves its step) instead of leaving it running."""

  def interrupted(_):
    raise KeyboardInterrupt
  pid_file = tmp_path / "pid"
  with pytest.raises(KeyboardInterrupt):
    ablate._subprocess([sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w')"
                        ".write(str(os.getpid())); time.sleep(60)"],
                       str(tmp_path / "log"), interrupted, every=0.5)
  with pytest.raises(ProcessLookupError):
    os.kill(int(pid_file.read_text()), 0)
