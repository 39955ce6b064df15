"""Start-up: seconds from typing `pretrain train configs/tiny-cpu.yaml` to the first finished step.

Runs the README quick-start's command (`pretrain train configs/tiny-cpu.yaml`: local Ray, 2
workers, DeepSpeed ZeRO-3, MLflow in SQLite) for a few steps as a subprocess, `--repeats` times
in one working directory, and splits each start-up into where it went:

- driver: the CLI's imports, config and corpus check (until the run directory's config.yaml is
  written); Ray's import; Ray's start (`ray.init`, from the run's `ray_started` event); Ray
  Train's import, once Ray is up (until the run's `workers_requested` event). The MLflow run is
  created on a thread from then on, while the worker group starts: its
  `mlflow_run_created` event is shown apart, as seconds from the command's start (off the path to
  the first step unless the ranks wait for its id);
- the worker group, from the driver's request (Ray Train's controller log, in the session
  directory of the Ray the run started): the controller's process, imports and first decision;
  the placement group and the worker processes with their Ray and Ray Train imports, until the
  actors exist; Ray Train's set-up (train context, our backend's rendezvous variables) until rank
  0 is in the training function;
- in rank 0 (from the run's `startup` event): imports, the torch process group (rendezvous of all
  ranks) and the layout's groups, model build (under ZeRO-3
  with DeepSpeed's import and comm init), `deepspeed.initialize`, data open and resume, tracking
  (metrics logger, event log), the first step (first batch included).

Also the CPU seconds that every process of the run (driver, Ray's services, Ray Train's actors,
the training workers) spent until the first step: on a shared machine the load stretches wall
time from one run to the next far more than the work done.

The repeats share one MLflow store, so the first run pays for creating it, as a fresh checkout's
first run does, and the others show every run after that. The corpus is the quick-start's
(`data/pystdlib`), prepared the quick-start's way when it is missing.

    python benchmarks/startup.py                 # 3 runs, ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (key, label) in the order they happen; the in-worker keys are the `startup` event's phases.
ROWS = [
    ("cli", "CLI: imports, config, corpus check"),
    ("mlflow_run", "driver: Ray's import"),
    ("ray_init", "Ray start (ray.init)"),
    ("after_ray", "driver: Ray Train's import, the trainer"),
    ("controller", "worker group: Ray Train's controller starts"),
    ("to_workers", "worker group: placement, worker processes (Ray's imports)"),
    ("ray_train_setup", "worker group: Ray Train's set-up -> rank 0 in the training function"),
    ("imports", "  rank 0: imports"),
    ("process_group", "  rank 0: process groups (all ranks meet)"),
    ("model", "  rank 0: model build (ZeRO-3: DeepSpeed import + comm init)"),
    ("deepspeed_initialize", "  rank 0: deepspeed.initialize"),
    ("data_and_resume", "  rank 0: data open, resume"),
    ("tracking", "  rank 0: metrics logger, event log"),
    ("first_step", "  rank 0: first step (first batch included)"),
    ("total", "total to the first finished step"),
    ("mlflow_created", "(MLflow run created, from the command's start; overlapped)"),
    ("wall", "whole command (steps, shutdown included)"),
]
CPU_KINDS = {
    "driver": "driver (pretrain train)",
    "ray_services": "Ray services (gcs, raylet, agents, log monitor)",
    "ray_train_actors": "Ray Train actors (controller, ...)",
    "workers": "training workers",
}


def ensure_corpus(path: Path) -> None:
    """The quick-start corpus: the standard library's *.py, byte-level BPE 4096, blocks of 129."""
    if (path / "manifest.json").is_file():
        return
    from trainer.data.prepare import prepare

    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    prepare(files, str(path), vocab_size=4096, block_len=129)


def read_events(run_dir: Path) -> dict[str, dict]:
    """The first event of each kind in the run's event log (none yet: empty)."""
    out: dict[str, dict] = {}
    path = run_dir / "events.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            e = json.loads(line)
        except ValueError:  # a line being written as we read
            continue
        out.setdefault(e["event"], e)
    return out


def controller_log_times(driver_pid: int, marks: dict[str, str], since: float = 0.0) -> dict[str, float]:
    """When Ray Train's controller first logged each of `marks` (key -> text in its message) at or
    after `since` (time.time()): its own log, in the session directory of the Ray that the driver
    with `driver_pid` started (Ray names the directory after that pid)."""
    import datetime
    import glob

    root = os.environ.get("RAY_TMPDIR", "/tmp/ray")
    found: dict[str, float] = {}
    for path in glob.glob(f"{root}/session_*_{driver_pid}/logs/train/ray-train-sys-controller-*.log"):
        for line in open(path):
            try:
                entry = json.loads(line)
                t = datetime.datetime.strptime(entry["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except (ValueError, KeyError, TypeError):
                continue
            for key, text in marks.items():
                if t >= since and key not in found and text in entry.get("message", ""):
                    found[key] = t
    return found


# What Ray Train's controller logs as it starts a worker group.
GROUP_MARKS = {
    "starting": "Attempting to start training worker group",
    "created": "worker actors created in",
}


def process_kind(p: psutil.Process, driver_pid: int) -> str:
    """Whose CPU a process's is: the nearest Ray worker among it and its parents decides (a compiler
    a training worker started is the worker's), else the driver's own or Ray's services'."""
    if p.pid == driver_pid:
        return "driver"
    for q in [p, *p.parents()]:
        name = (q.cmdline() or [""])[0]
        if name.startswith("ray::RayTrainWorker"):
            return "workers"
        if name.startswith("ray::") and "Agent" not in name:
            return "ray_train_actors"  # controller, synchronization, autoscaling coordinator, ...
    return "ray_services"  # gcs, raylet, object store, agents, log monitor, ...


def run_once(config: str, corpus: Path, work: Path, name: str, steps: int, extra: list[str]) -> dict:
    sets = [
        f"data.path={corpus}",
        f"train.steps={steps}",
        "checkpoint.save_final=false",
        f"cluster.run_name={name}",
        f"cluster.storage_path={work}/runs",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        *extra,
    ]
    # Run from the work directory: MLflow puts a SQLite store's artifacts under ./mlruns.
    cmd = [sys.executable, "-m", "launch.cli", "train", str(ROOT / config)]
    cmd += [a for s in sets for a in ("--set", s)]
    run_dir = work / "runs" / name
    load = os.getloadavg()
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    # CPU seconds of every process of the run (the driver and all it starts), sampled until the
    # first step has finished: a busy machine's load stretches wall time, far less the CPU spent.
    root, cpu, kinds, first_step_cpu = psutil.Process(proc.pid), {}, {}, None
    while proc.poll() is None and first_step_cpu is None:
        for p in [root, *root.children(recursive=True)]:
            try:
                kinds[p.pid] = process_kind(p, proc.pid)  # a worker is ray::IDLE until it has a task
                cpu[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        if "startup" in read_events(run_dir):
            first_step_cpu = {k: sum(c for pid, c in cpu.items() if kinds[pid] == k) for k in CPU_KINDS}
        time.sleep(0.5)
    proc.wait()
    reader.join()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pretrain train failed (exit {proc.returncode}):\n{''.join(output)[-5000:]}")
    events = read_events(run_dir)
    ray_up, requested, startup = events["ray_started"], events["workers_requested"], events["startup"]
    ray_begin = ray_up["time"] - ray_up["init_s"]
    config_written = (run_dir / "config.yaml").stat().st_mtime

    group = controller_log_times(proc.pid, GROUP_MARKS)
    nan = float("nan")
    created = events.get("mlflow_run_created")
    return {
        "load_avg_1m": load[0],
        "cli": config_written - t0,
        "mlflow_run": ray_begin - config_written,
        "ray_init": ray_up["init_s"],
        "after_ray": requested["time"] - ray_up["time"],
        "controller": group.get("starting", nan) - requested["time"],
        "to_workers": group.get("created", nan) - group.get("starting", nan),
        "ray_train_setup": startup["since"] - group.get("created", nan),
        "worker_group": startup["since"] - requested["time"],
        "mlflow_created": created["time"] - t0 if created else float("nan"),
        **startup["phases_s"],
        "first_batch_wait": startup["first_batch_wait_s"],
        "total": startup["time"] - t0,
        "wall": wall,
        "cpu_s": first_step_cpu or {},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny-cpu.yaml")
    ap.add_argument(
        "--data", default="data/pystdlib", help="corpus; prepared the quick-start's way if missing"
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--json", help="also write the figures of every run here")
    args = ap.parse_args()

    corpus = (ROOT / args.data).resolve()
    ensure_corpus(corpus)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            run_once(args.config, corpus, Path(tmp), f"startup-{i}", args.steps, args.set)
            for i in range(args.repeats)
        ]
    label_w = max(len(label) for _, label in ROWS)

    def row(label: str, values: list[float], median: bool = True) -> None:
        cells = "".join(f"{v:8.1f}" for v in values)
        print(f"{label:{label_w}}{cells}{f'{statistics.median(values):9.1f}' if median else ''}")

    print(f"start-up of `pretrain train {args.config}`, seconds ({os.cpu_count()} CPUs)")
    header = "".join(f"{'run ' + str(i + 1):>8}" for i in range(len(runs)))
    print(f"{'':{label_w}}{header}{'median':>9}")
    for key, label in ROWS:
        row(label, [r.get(key, float("nan")) for r in runs])
        if key == "first_step":
            row("    (of which waiting for the first batch)", [r["first_batch_wait"] for r in runs])
    print("CPU seconds until the first finished step, all processes of the run")
    for key, label in CPU_KINDS.items():
        row(f"  {label}", [r["cpu_s"].get(key, 0.0) for r in runs])
    row("  total", [sum(r["cpu_s"].values()) for r in runs])
    row("load average (1 min) at start", [r["load_avg_1m"] for r in runs], median=False)
    print("run 1 creates the MLflow store; later runs reuse it")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
