"""The Mask R-CNN paper's Table 2 ablations (and Mask Scoring R-CNN), trained and evaluated here.

    python -m maskrcnn_jax.experiments.ablate --table 2c
    python -m maskrcnn_jax.experiments.ablate --table 2b,2e,ms --seeds 2 --max_runs 4
    python -m maskrcnn_jax.experiments.ablate --table all --report_only

Every row of a table is a config under `configs/ablations/` (runnable alone with train.py); each
runs at the same budget for every seed (`training.seed` and `data.seed`), through train.py and
eval.py in subprocesses, into WORKDIR/<config>/seed_<n>, with their logs there. Runs resume: a
finished run (its eval/final/metrics.json, after training reached the config's last step) is
skipped, an interrupted one continues from its last checkpoint, so a table can be spread over
several sittings (`--max_runs`); a run another sitting holds (a lock in its folder) is skipped; a
run that fails is reported with the end of its log, and the sitting goes on. A run folder is tied
to its settings (row, seed, overrides and the text of the config files it reads): other settings
for the same folder are an error (use another --workdir). Rows shared between tables (the R50-C4
and R50-FPN baselines) train once.

The paper ran Tables 2b and 2c on R50-C4. Its C4 model trained ~13x slower here than the FPN one
(0.25 vs 3.3 steps/s at 5f8db58; the res5 head runs on every sampled RoI), so "2b" and "2c" run
on R50-FPN, beside the paper's C4 figures; "2b-c4" and "2c-c4" are the same tables on R50-C4.
"2a-fpn" is Table 2a without its two C4 rows (~100 min per C4 run on 2 cores).

Per table it prints mask AP / AP50 / AP75 and box AP (percent) per row as the mean over seeds and
their spread (max - min), beside the paper's mask AP, then the paper's ordering checked pair by
pair: a difference of means smaller than the larger spread of the two rows is a tie, not a
ranking (no verdict while a row has fewer than two seeds). It writes WORKDIR/table_<t>.md (the
same table in Markdown) and WORKDIR/table_<t>.png.

This is a tool of the source checkout: it runs the checkout's train.py and eval.py.
"""
import dataclasses
import datetime
import fcntl
import importlib
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Row:
  label: str
  config: str
  """File stem under configs/ablations/."""
  paper: float
  """The paper's mask AP (COCO minival, percent)."""


@dataclasses.dataclass(frozen=True)
class Table:
  title: str
  rows: Tuple[Row, ...]


def _tables_2b_2c(model: str) -> Dict[str, Table]:
  """Tables 2b and 2c on `model` "c4" (R50-C4, the paper's) or "fpn" (R50-FPN); the paper's
  figures are R50-C4's either way."""
  note = "R50-C4, the paper's backbone" if model == "c4" else "R50-FPN; the paper's figures: R50-C4"
  suffix = "-c4" if model == "c4" else ""
  base = f"r50_{model}"
  return {
      "2b" + suffix: Table(f"Table 2b, mask loss ({note})", (
          Row("softmax over classes", f"{model}_softmax", 24.8),
          Row("class-agnostic sigmoid", f"{model}_agnostic", 29.7),
          Row("per-class sigmoid", base, 30.3))),
      "2c" + suffix: Table(f"Table 2c, RoI layer ({note})", (
          Row("RoIPool (max)", f"{model}_roipool", 26.9),
          Row("RoIWarp max", f"{model}_roiwarp_max", 27.2),
          Row("RoIWarp ave", f"{model}_roiwarp_ave", 27.1),
          Row("RoIAlign max", f"{model}_roialign_max", 30.2),
          Row("RoIAlign ave", base, 30.3))),
  }


_FPN_BACKBONE_ROWS = (Row("R50-FPN", "r50_fpn", 33.6), Row("R101-FPN", "r101_fpn", 35.4))

TABLES: Dict[str, Table] = {
    "2a": Table("Table 2a, backbone", (
        Row("R50-C4", "r50_c4", 30.3), Row("R101-C4", "r101_c4", 32.7)) + _FPN_BACKBONE_ROWS),
    "2a-fpn": Table("Table 2a, backbone (the FPN rows only)", _FPN_BACKBONE_ROWS),
    **_tables_2b_2c("fpn"),
    **_tables_2b_2c("c4"),
    "2e": Table("Table 2e, mask head (R50-FPN)", (
        Row("MLP fc 1024-1024", "fpn_mlp2", 31.5), Row("MLP fc 1024-1024-1024", "fpn_mlp3", 31.5),
        Row("FCN", "r50_fpn", 33.6))),
    "ms": Table("Mask Scoring R-CNN (R50-FPN)", (
        Row("Mask R-CNN", "r50_fpn", 34.2), Row("+ MaskIoU head", "fpn_maskiou", 35.6))),
}
METRICS = (("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"), ("bbox", "AP"))

FLAGS = flags.FLAGS
flags.DEFINE_string("table", "2c", f"Comma-separated tables ({', '.join(TABLES)}) or 'all'.")
flags.DEFINE_integer("seeds", 2, "Seeds per row (0, 1, ...).")
flags.DEFINE_string("workdir", os.path.join(REPO, "outputs", "ablations"),
                    "Where the runs and tables go.")
flags.DEFINE_integer("max_runs", 0, "Train at most this many runs in this sitting (0 = all).")
flags.DEFINE_string("record_dir", os.path.join(REPO, "benchmarks", "ablations"),
                    "Where finished runs are recorded (kept across sittings and workdirs); '' = "
                    "none.")
flags.DEFINE_bool("report_only", False, "Only print the tables of the runs already finished.")
flags.DEFINE_multi_string("override", [], "Extra config overrides for every run, e.g. "
                          "'training.steps=20' (a different budget needs its own --workdir).")


def tables_from_flag(value: str) -> List[str]:
  names = list(TABLES) if value == "all" else [t.strip() for t in value.split(",") if t.strip()]
  bad = [t for t in names if t not in TABLES]
  if bad or not names:
    raise app.UsageError(f"--table: unknown {bad or value!r}; known: {', '.join(TABLES)}, all")
  return names


def config_path(row: Row) -> str:
  return os.path.join(REPO, "configs", "ablations", row.config + ".py")


def run_dir(workdir: str, config: str, seed: int) -> str:
  return os.path.join(workdir, config, f"seed_{seed}")


def metrics_path(rdir: str) -> str:
  return os.path.join(rdir, "eval", "final", "metrics.json")


def _check_settings(rdir: str, settings: Dict, create: bool = False) -> None:
  """A run folder is tied to its settings and to the row's resolved config: reusing it with others
  is an error. Writes run.json (the settings) when `create` and there is none yet."""
  path = os.path.join(rdir, "run.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if {k: old.get(k) for k in settings} != settings:
      changed = sorted(k for k in settings if old.get(k) != settings[k])
      raise app.UsageError(f"{rdir} was run with other settings ({', '.join(changed)} differ: "
                           f"{ {k: old.get(k) for k in changed} }): pass another --workdir")
    trained = os.path.join(rdir, "config.json")
    if os.path.exists(trained):
      with open(trained) as f:
        problems = config_problems(json.load(f), settings)
      if problems:
        raise app.UsageError(f"{rdir} was trained with another config ({'; '.join(problems)}):"
                             " pass another --workdir")
  elif create:
    os.makedirs(rdir, exist_ok=True)
    _write_json(path, dict(settings, train_s=0.0, eval_s=0.0, commit=_commit(), cpu=_cpu()))


def expected_config(config: str, seed: int) -> Dict:
  """The resolved config (as train.py writes it to config.json) of row `config` at `seed`,
  before --override."""
  module = importlib.import_module(f"configs.ablations.{config}")
  c = module.get_config()
  c.training.seed = seed
  c.data.seed = seed
  return json.loads(c.to_json_best_effort())


def _flatten(d: Dict, prefix: str = "") -> Dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_problems(recorded: Dict, settings: Dict) -> List[str]:
  """How a run's recorded config (its config.json) differs from the row's config now: every key
  it recorded must hold the same value (keys named by the run's --override excepted); keys added
  since are switches defaulting to the earlier behaviour and are accepted."""
  now = _flatten(expected_config(settings["config"], settings["seed"]))
  overridden = {o.split("=", 1)[0].strip() for o in settings.get("overrides", ())}
  problems = []
  for k, v in sorted(_flatten(recorded).items()):
    if k in overridden:
      continue
    if k not in now:
      problems.append(f"{k}: {v!r} -> <absent>")
    elif now[k] != v:
      problems.append(f"{k}: {v!r} -> {now[k]!r}")
  return problems[:8] + ([f"... {len(problems) - 8} more"] if len(problems) > 8 else [])


def _settings(row: Row, seed: int, overrides: Optional[Sequence[str]] = None) -> Dict:
  overrides = FLAGS.override if overrides is None else overrides
  return dict(config=row.config, seed=seed, overrides=list(overrides))


def _last_checkpoint(rdir: str) -> int:
  ckpts = os.path.join(rdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
  return max(steps, default=0)


def _trained_steps(rdir: str) -> int:
  """training.steps of the run (the config.json train.py wrote)."""
  with open(os.path.join(rdir, "config.json")) as f:
    return int(json.load(f)["training"]["steps"])


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _add_time(rdir: str, key: str, seconds: float) -> None:
  path = os.path.join(rdir, "run.json")
  with open(path) as f:
    info = json.load(f)
  info[key] = info.get(key, 0.0) + seconds
  _write_json(path, info)


def _subprocess(cmd: Sequence[str], log: str, add_seconds: Callable[[float], None],
                every: float = 30.0) -> None:
  """Runs cmd from the checkout with output to `log`; raises on failure. Its wall time goes to
  `add_seconds` as it passes (every `every` seconds and at the end), so a run whose runner is
  killed (a sitting that ends) keeps the time it had trained, less at most `every` seconds."""
  with open(log, "a") as f:
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    last = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
      while True:
        try:
          rc = proc.wait(timeout=every)
          break
        except subprocess.TimeoutExpired:
          now = time.time()
          add_seconds(now - last)
          last = now
    except BaseException:  # e.g. Ctrl-C: SIGTERM makes train.py save its step and exit
      proc.terminate()
      proc.wait()
      raise
    finally:
      add_seconds(time.time() - last)
  if rc != 0:
    with open(log) as f:
      tail = "".join(f.readlines()[-15:])
    raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {rc}); the end of {log}:\n{tail}")


def train_and_evaluate(row: Row, seed: int, workdir: str, overrides: Sequence[str]) -> Dict:
  """One run: train (resuming) and evaluate unless already done. Returns its metrics.json."""
  rdir = run_dir(workdir, row.config, seed)
  _check_settings(rdir, _settings(row, seed, overrides), create=True)
  cfg = ["--config", config_path(row)]
  sets = [f"--config.training.seed={seed}", f"--config.data.seed={seed}"] + [
      f"--config.{o}" for o in overrides]
  _subprocess([sys.executable, "train.py", *cfg, "--workdir", rdir, *sets],
              os.path.join(rdir, "train.log"), lambda s: _add_time(rdir, "train_s", s))
  step, steps = _last_checkpoint(rdir), _trained_steps(rdir)
  if step < steps:  # train.py saves and exits 0 when stopped (SIGTERM): not finished
    raise RuntimeError(f"training stopped at step {step} of {steps} (interrupted?); rerun to "
                       "resume it")
  _subprocess([sys.executable, "eval.py", *cfg, "--workdir", rdir, "--num_pictures", "0", *sets],
              os.path.join(rdir, "eval.log"), lambda s: _add_time(rdir, "eval_s", s))
  with open(metrics_path(rdir)) as f:
    return json.load(f)


def record_path(record_dir: str, config: str, seed: int) -> str:
  return os.path.join(record_dir, config, f"seed_{seed}.json")


def _commit() -> Optional[str]:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
  except OSError:
    return None
  return out.stdout.strip() or None


def _cpu() -> Optional[str]:
  """The machine's CPU model and core count (runs on different machines differ slightly: XLA
  compiles for the CPU it runs on)."""
  try:
    with open("/proc/cpuinfo") as f:
      models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  except OSError:
    return None
  return f"{models[0]} x{len(models)}" if models else None


def record_run(rdir: str, record_dir: str, settings: Dict) -> str:
  """Writes the record of the finished run in `rdir` (metrics, times, resolved config)."""
  with open(metrics_path(rdir)) as f:
    metrics = json.load(f)
  with open(os.path.join(rdir, "run.json")) as f:
    info = json.load(f)
  with open(os.path.join(rdir, "config.json")) as f:
    config = json.load(f)
  path = record_path(record_dir, settings["config"], settings["seed"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _write_json(path, dict(
      settings, metrics={k: metrics[k] for k in ("segm", "bbox") if k in metrics},
      train_s=info.get("train_s", 0.0), eval_s=info.get("eval_s", 0.0),
      commit=info.get("commit"), cpu=info.get("cpu"), recorded_with=_commit(),
      recorded=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      resolved_config=config))
  return path


def load_record(record_dir: str, settings: Dict) -> Optional[Dict]:
  """The recorded run with these settings whose config still holds, or None (a stale record is
  reported)."""
  if not record_dir:
    return None
  path = record_path(record_dir, settings["config"], settings["seed"])
  try:
    with open(path) as f:
      rec = json.load(f)
  except (OSError, ValueError):
    return None
  if rec.get("overrides") != settings["overrides"]:
    return None
  problems = config_problems(rec.get("resolved_config", {}), settings)
  if problems:
    print(f"{path} is stale (the config changed since: {'; '.join(problems)}); the run is "
          "trained again", flush=True)
    return None
  return rec


def load_run(workdir: str, config: str, seed: int) -> Optional[Dict]:
  """A finished run's {metrics, train_s, eval_s, commit}, from the workdir or else from
  --record_dir; None if neither has it."""
  rdir = run_dir(workdir, config, seed)
  try:
    with open(metrics_path(rdir)) as f:
      metrics = json.load(f)
    with open(os.path.join(rdir, "run.json")) as f:
      info = json.load(f)
  except (OSError, ValueError):  # absent, or cut short by an interruption: not finished
    rec = load_record(FLAGS.record_dir, dict(config=config, seed=seed,
                                             overrides=list(FLAGS.override)))
    return None if rec is None else dict(metrics=rec["metrics"], train_s=rec["train_s"],
                                         eval_s=rec["eval_s"], commit=rec.get("commit"))
  return dict(metrics=metrics, train_s=info.get("train_s", 0.0), eval_s=info.get("eval_s", 0.0),
              commit=info.get("commit"))


def _value(metrics: Dict, task: str, key: str) -> Optional[float]:
  stats = metrics.get(task)
  return None if not stats or key not in stats else 100.0 * float(stats[key])


def row_summary(workdir: str, row: Row, seeds: int) -> Dict:
  """{seeds_done, per metric (mean, spread, values), minutes per run, commits trained at}."""
  runs = [r for r in (load_run(workdir, row.config, s) for s in range(seeds)) if r]
  out = dict(row=row, done=len(runs), commits={r.get("commit") or "unknown" for r in runs})
  for task, key in METRICS:
    vals = [v for v in (_value(r["metrics"], task, key) for r in runs) if v is not None]
    out[f"{task}/{key}"] = ((sum(vals) / len(vals), max(vals) - min(vals), vals) if vals
                            else None)
  out["minutes"] = (sum(r["train_s"] + r["eval_s"] for r in runs) / len(runs) / 60.0
                    if runs else None)
  return out


def compare(a: Dict, b: Dict, key: str = "segm/AP") -> str:
  """The paper ranks row a below row b: what our runs say."""
  if a[key] is None or b[key] is None:
    return f"{b['row'].label} - {a['row'].label}: not measured yet"
  (ma, sa, va), (mb, sb, vb) = a[key], b[key]
  if min(len(va), len(vb)) < 2:
    return (f"{b['row'].label} - {a['row'].label}: {mb - ma:+.1f}: no verdict before two seeds "
            "per row")
  delta, spread = mb - ma, max(sa, sb)
  if a["row"].paper == b["row"].paper:
    verdict = "equal in the paper; " + ("a tie here" if abs(delta) <= spread else "differ here")
  elif abs(delta) <= spread:
    verdict = "tie (difference within the spread)"
  elif delta > 0:
    verdict = "agrees"
  else:
    verdict = "reversed"
  return f"{b['row'].label} - {a['row'].label}: {delta:+.1f} (spread {spread:.1f}): {verdict}"


def format_table(name: str, table: Table, summaries: List[Dict], seeds: int) -> str:
  """Markdown: one line per row, then the paper's ordering checked."""
  head = ("| row | paper mask AP | mask AP | AP50 | AP75 | box AP | seeds | min/run |\n"
          "|---|---|---|---|---|---|---|---|")
  lines = [f"### {table.title} ({name})", "", head]
  for s in summaries:
    cells = []
    for task, key in METRICS:
      v = s[f"{task}/{key}"]
      cells.append("-" if v is None else f"{v[0]:.1f} ± {v[1] / 2:.1f}")
    minutes = "-" if s["minutes"] is None else f"{s['minutes']:.1f}"
    lines.append(f"| {s['row'].label} | {s['row'].paper:.1f} | " + " | ".join(cells)
                 + f" | {s['done']}/{seeds} | {minutes} |")
  lines += ["", "(mean ± half the spread over seeds; AP in percent)", "",
            "Ordering of the paper, pair by pair (by paper mask AP):"]
  ranked = sorted(summaries, key=lambda s: s["row"].paper)
  lines += [f"- {compare(a, b)}" for a, b in zip(ranked, ranked[1:])]
  commits = sorted(set().union(*(s["commits"] for s in summaries)))
  if len(commits) > 1:
    lines += ["", f"Warning: the runs were trained at {len(commits)} commits ("
              + ", ".join(c[:7] for c in commits) + "): a difference between rows may come "
              "from the code as well as from the switch."]
  elif commits:
    lines += ["", f"Every run trained at commit {commits[0][:7]}."]
  return "\n".join(lines) + "\n"


def plot_table(path: str, table: Table, summaries: List[Dict]) -> None:
  """Mask AP per row: each seed a dot, the mean a bar; the paper's figure a diamond (right axis)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(summaries), 3.6))
  paper_ax = ax.twinx()
  for i, s in enumerate(summaries):
    v = s["segm/AP"]
    if v is not None:
      ax.bar(i, v[0], color="#9bb7d4", width=0.6)
      ax.plot([i] * len(v[2]), v[2], "o", color="#1f4e79", ms=4)
    paper_ax.plot(i, s["row"].paper, "D", color="#c0392b", ms=6)
  ax.set_xticks(range(len(summaries)))
  ax.set_xticklabels([s["row"].label for s in summaries], rotation=15, fontsize=8)
  ax.set_ylabel("mask AP here (shapes, %)")
  paper_ax.set_ylabel("paper mask AP (COCO, %)", color="#c0392b")
  ax.set_title(table.title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not os.path.exists(os.path.join(REPO, "train.py")):
    raise app.UsageError(f"{REPO} is not a maskrcnn_jax checkout (no train.py): run from one")
  names = tables_from_flag(FLAGS.table)
  seeds = FLAGS.seeds
  if seeds < 1:
    raise app.UsageError("--seeds must be >= 1")
  workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
  todo, seen = [], set()
  for name in names:
    for row in TABLES[name].rows:
      for seed in range(seeds):
        if (row.config, seed) not in seen:
          seen.add((row.config, seed))
          todo.append((name, row, seed))
  missing = sorted({config_path(r) for _, r, _ in todo if not os.path.exists(config_path(r))})
  if missing:
    raise app.UsageError(f"missing configs: {missing}")
  record_dir = FLAGS.record_dir and os.path.abspath(os.path.expanduser(FLAGS.record_dir))
  for _, row, seed in todo:  # before anything runs: every folder fits its settings
    rdir = run_dir(workdir, row.config, seed)
    _check_settings(rdir, _settings(row, seed))
    if record_dir and os.path.exists(metrics_path(rdir)) and \
        load_record(record_dir, _settings(row, seed)) is None:
      print(f"recorded {record_run(rdir, record_dir, _settings(row, seed))}", flush=True)
  if not FLAGS.report_only:
    trained = 0
    failed = 0
    for i, (name, row, seed) in enumerate(todo, 1):
      tag = f"[{i}/{len(todo)}] {name} {row.label} seed {seed}"
      rdir = run_dir(workdir, row.config, seed)
      if load_run(workdir, row.config, seed) is not None:
        print(f"{tag}: done earlier", flush=True)
        continue
      if FLAGS.max_runs and trained + failed >= FLAGS.max_runs:
        print(f"{tag}: left for a later sitting (--max_runs {FLAGS.max_runs})", flush=True)
        continue
      os.makedirs(rdir, exist_ok=True)
      with open(os.path.join(rdir, ".lock"), "w") as lock:
        try:
          fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
          print(f"{tag}: another sitting is running it; skipped", flush=True)
          continue
        print(f"{tag}: training {row.config} in {rdir}", flush=True)
        start = time.time()
        try:
          metrics = train_and_evaluate(row, seed, workdir, FLAGS.override)
        except RuntimeError as e:
          failed += 1
          print(f"{tag}: FAILED after {(time.time() - start) / 60:.1f} min: {e}", flush=True)
          continue
      trained += 1
      if record_dir:
        record_run(rdir, record_dir, _settings(row, seed))
      mask, box = _value(metrics, "segm", "AP"), _value(metrics, "bbox", "AP")
      fmt = lambda v: "-" if v is None else f"{v:.1f}"
      print(f"{tag}: {(time.time() - start) / 60:.1f} min, mask AP {fmt(mask)}, box AP "
            f"{fmt(box)}", flush=True)
    if failed:
      print(f"{failed} run(s) failed (their logs are in their folders); rerun to retry them")
  os.makedirs(workdir, exist_ok=True)
  for name in names:
    table = TABLES[name]
    summaries = [row_summary(workdir, row, seeds) for row in table.rows]
    text = format_table(name, table, summaries, seeds)
    print("\n" + text)
    with open(os.path.join(workdir, f"table_{name}.md"), "w") as f:
      f.write(text)
    if any(s["segm/AP"] is not None for s in summaries):
      plot_table(os.path.join(workdir, f"table_{name}.png"), table, summaries)


if __name__ == "__main__":
  app.run(main)
