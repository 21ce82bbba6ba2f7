"""benchmarks/bench_device.py and benchmarks/hlo_report.py run on this CPU and print tables."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  r = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=timeout)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  return r.stdout


@pytest.mark.slow
def test_bench_device_small_on_cpu(tmp_path):
  out = _run(["benchmarks/bench_device.py", "--small", "--canvas", "64", "--infer_batches", "1",
              "--runs", "1",
              "--json", str(tmp_path / "d.json")])
  assert "| inference | 1 |" in out and "| training | 2 |" in out and "(RSS)" in out
  rec = json.loads((tmp_path / "d.json").read_text())
  assert rec["platform"] == "cpu" and [r["program"] for r in rec["rows"]] == ["inference",
                                                                             "training"]
  for r in rec["rows"]:
    assert r["images_per_s"] > 0 and r["compile_s"] > 0 and r["mfu"] is None
    assert r["flops_per_image"] > 1e8  # the tiny model at 128 px: ~1 GFLOP forward
  train, infer = rec["rows"][1], rec["rows"][0]
  assert 2 < train["flops_per_image"] / infer["flops_per_image"] < 8  # backward ~2x forward


def test_peak_flops_table():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import bench_device
  finally:
    sys.path.pop(0)
  assert bench_device.peak_flops("TPU v4") == 275e12
  assert bench_device.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert bench_device.peak_flops("TPU v5 lite") == 197e12
  assert bench_device.peak_flops("cpu") is None


def test_hlo_report_tpu_and_cuda_programs_have_no_nms_or_sampling_scatter():
  """The tiny model's train step lowered for tpu and cuda: no scatter at all (NMS, sampling, the
  losses, the mask targets, RoIAlign's backward), while CPU keeps the greedy NMS loop and
  RoIAlign's scatter-add backward (the faster forms there)."""
  out = _run(["benchmarks/hlo_report.py", "--config", "configs/tiny.py", "--platforms",
              "cpu,tpu,cuda", "--what", "train", "--by_origin"])
  rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| train |")]
  origin = {(r[1].strip(), r[2].strip()): [int(v) for v in r[3:9]] for r in rows if len(r) == 9}
  for platform in ("tpu", "cuda"):
    for src in ("ops/nms.py", "ops/sampling.py", "modeling/losses.py", "ops/masks.py",
                "ops/roi_align.py"):
      counts = origin.get((platform, src))
      assert counts is None or counts[1] == 0, (platform, src, counts)  # scatter column
    assert sum(c[1] for (p, _), c in origin.items() if p == platform) == 0, platform
  assert origin[("cpu", "ops/nms.py")][1] >= 1  # CPU keeps the greedy loop (its scatter)
  assert origin[("cpu", "ops/roi_align.py")][1] >= 1  # and the scatter-add backward
