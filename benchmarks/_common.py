"""Helpers shared by the benchmark scripts: timing, resident memory, child processes.

Numpy and the standard library only, so a script can import this before deciding whether (and in
which order) to import torch, TensorFlow or jax.
"""
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_repo_to_path() -> None:
  """Makes `import maskrcnn_jax` and `import tests...` work when a script is run by path."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


class Timings(NamedTuple):
  """Per call: wall-clock seconds, CPU seconds of this process (all its threads), and the average
  number of cores that other processes kept busy meanwhile (None where /proc/stat is missing)."""
  wall: List[float]
  cpu: List[float]
  others: List[Optional[float]]


def machine_busy_seconds() -> Optional[float]:
  """CPU seconds all processes on the machine have been busy (from /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  # user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
  busy = sum(fields[:3]) + sum(fields[5:8])
  return busy / os.sysconf("SC_CLK_TCK")


def measure(fn: Callable[[], object]):
  """Calls `fn` once; returns (wall s, own CPU s, cores busy with other processes or None)."""
  busy = machine_busy_seconds()
  cpu = time.process_time()
  start = time.perf_counter()
  fn()
  wall = time.perf_counter() - start
  cpu = time.process_time() - cpu
  busy_after = machine_busy_seconds()
  others = None
  if busy is not None and busy_after is not None and wall > 0:
    others = max(0.0, (busy_after - busy - cpu) / wall)
  return wall, cpu, others


def timed(fn: Callable[[], object]) -> float:
  """Seconds one call of `fn` takes (wall clock)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved_times(fns: Dict[str, Callable[[], object]], runs: int,
                      warmup: int = 1) -> Dict[str, Timings]:
  """Wall and CPU seconds per call of each fn, `{name: Timings}`, after `warmup` untimed calls.

  The calls are interleaved (one of each per round) so that load from other processes on the
  machine hits every side alike. CPU time counts the work done whoever else runs; on a busy machine
  it is the steadier of the two (spinning thread pools inflate it, though).
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: Timings([], [], []) for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      for field, value in zip(Timings._fields, measure(fn)):
        getattr(times[name], field).append(value)
  return times


def median(xs: Sequence[float]) -> float:
  return float(np.median(np.asarray(xs, np.float64)))


def median_or_none(xs: Sequence[Optional[float]]) -> Optional[float]:
  xs = [x for x in xs if x is not None]
  return median(xs) if xs else None


def spread(xs: Sequence[float]) -> float:
  """(max - min) / median of a list of timings: how noisy the machine was."""
  m = median(xs)
  return float((max(xs) - min(xs)) / m) if m > 0 else 0.0


def proc_status_mb(field: str) -> Optional[float]:
  """A `VmXXX` field of /proc/self/status (e.g. 'VmRSS', 'VmHWM') in MB, or None off Linux."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def maxrss_mb() -> float:
  """`getrusage(RUSAGE_SELF).ru_maxrss` in MB (Linux reports kB).

  Note: Linux carries the parent's peak across fork + exec into this figure, so a child started from
  a large process reads at least the parent's peak; `proc_status_mb('VmHWM')` is per address space
  and starts fresh at exec.
  """
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux `clear_refs` 5); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def run_json_child(args: Sequence[str], env: Optional[Dict[str, str]] = None) -> dict:
  """Runs `python <args>` and parses the last stdout line as JSON; raises with stderr on failure."""
  proc = subprocess.run([sys.executable] + list(args), capture_output=True, text=True,
                        env=dict(os.environ if env is None else env))
  if proc.returncode != 0:
    raise RuntimeError(f"child {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> str:
  """The 1-minute load average and core count, to judge how busy the machine was."""
  try:
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
  except OSError:
    return f"{os.cpu_count()} cores"
