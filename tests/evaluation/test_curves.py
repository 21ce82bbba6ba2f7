"""curves: TensorBoard scalars read back exactly, the right ones plotted, a PNG written."""
import os

import pytest
from PIL import Image

from maskrcnn_jax.evaluation import curves
from maskrcnn_jax.training.trainer import SummaryWriter


def _write_run(workdir):
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  for step in (10, 20, 30):
    writer.scalars(step, {"loss": 2.0 / step, "loss_mask": 0.5 / step, "lr": 0.01}, "train")
  for step in (20, 30):
    writer.scalars(step, {"bbox/AP": step / 100, "bbox/AP50": step / 50, "bbox/AP75": 0.1}, "eval")
  writer.flush()


def test_scalars_round_trip_and_plot(tmp_path, monkeypatch):
  _write_run(str(tmp_path))
  scalars = curves.read_scalars(str(tmp_path / "tensorboard"))
  assert scalars["train/loss"] == [(10, pytest.approx(0.2)), (20, pytest.approx(0.1)),
                                   (30, pytest.approx(2.0 / 30))]
  assert scalars["eval/bbox/AP50"] == [(20, pytest.approx(0.4)), (30, pytest.approx(0.6))]

  plotted = {}
  real_plot = curves.plot_curves
  def plot(data, path, title):
    plotted.update(data)
    return real_plot(data, path, title)
  monkeypatch.setattr(curves, "plot_curves", plot)
  assert curves.main(["curves", str(tmp_path)]) == 0
  assert sorted(plotted) == ["eval/bbox/AP", "eval/bbox/AP50", "loss", "loss_mask"]
  with Image.open(tmp_path / "curves.png") as im:
    assert im.size[0] > 600 and im.size[1] > 300


def test_no_events_is_an_error(tmp_path, capsys):
  assert curves.main(["curves", str(tmp_path)]) == 1
  assert "no TensorBoard scalars" in capsys.readouterr().err
