"""train.py's command line: config errors are one clear line, not a traceback."""
import subprocess
import sys

import pytest

from tests.training import common


def _train_py(*args):
  return subprocess.run([sys.executable, "train.py", *args], cwd=common.REPO, env=common.env(),
                        capture_output=True, text=True, timeout=300)


def _one_line_error(r, *needles):
  assert r.returncode != 0
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert "Traceback" not in r.stderr
  for n in needles:
    assert n in lines[0], lines[0]


def test_missing_config_file(tmp_path):
  _one_line_error(_train_py("--config", "configs/nope.py", "--workdir", str(tmp_path)),
                  "config file not found", "configs/nope.py")


def test_no_config_flag(tmp_path):
  _one_line_error(_train_py("--workdir", str(tmp_path)), "--config is required")


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  _one_line_error(_train_py("--config", "configs/tiny.py", "--workdir", str(blocker / "run")),
                  "cannot write to --workdir", str(blocker / "run"))


def test_unknown_config_field(tmp_path):
  r = _train_py("--config", "configs/tiny.py", "--workdir", str(tmp_path),
                "--config.training.lr=0.1")
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  assert "lr" in r.stderr


@pytest.mark.slow
def test_unreadable_init_weights(tmp_path):
  bad = tmp_path / "weights.pth"
  bad.write_bytes(b"not a torch file")
  r = _train_py("--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
                f"--config.init.torchvision_checkpoint={bad}",
                f"--config.data.cache_dir={tmp_path / 'shapes'}",
                "--config.data.shapes.num_train=4", "--config.data.shapes.num_val=2")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("train.py: error: ")]
  assert len(errors) == 1, r.stderr[-2000:]
  assert "config.init.torchvision_checkpoint" in errors[0] and "cannot read" in errors[0]
