"""Checkpoint cost, measured side by side in one run.

1. Save and load of a committed checkpoint (DeepSpeed shards + our state + sha256 commit
   record, verification on load) against copying the same bytes with a plain file copy on the
   same disk.
2. Recovery: the time from a Ray Train worker's SIGKILL to the first finished step after Ray
   restarted the group and it resumed from the newest commit (real local Ray, 2 workers), in
   phases: detection, group restart, rank 0's start-up (checkpoint verify + load among them).
3. The training stall of a synchronous save against a background one (`checkpoint.async`), for
   the quick-start model (configs/tiny-cpu.yaml) and a ~100M-parameter model: the seconds
   training stood still, and the step time while the background save was in flight against the
   step time without one (same process, same engine, steps timed one by one).

    python benchmarks/checkpoint.py            # ~8-10 minutes on 2 CPU cores (the ~100M model: ~5)
    python benchmarks/checkpoint.py --only-stall --threads 1 [--stall-models quick|100m]
    python benchmarks/checkpoint.py --only-recovery [--recovery-repeats 3]   # ~1 minute a run
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def save_load_vs_copy(d_model: int, n_layers: int, zero_stage: int, repeats: int = 3) -> dict:
    import torch

    from trainer.checkpoint import CheckpointManager
    from trainer.config import from_dict
    from trainer.engine import initialize
    from trainer.model import Transformer, param_count
    from trainer.session import Session

    cfg = from_dict(
        {
            "model": {
                "vocab_size": 8192,
                "d_model": d_model,
                "n_layers": n_layers,
                "n_heads": 8,
                "max_seq_len": 64,
            },
            "data": {"seq_len": 64},
            "cluster": {"num_workers": 1},
            "tracking": {"enabled": False},
            "parallel": {"zero_stage": zero_stage, "micro_batch_size": 2, "global_batch_size": 2},
        }
    )
    Session().ensure_process_group("gloo")
    torch.manual_seed(0)
    engine, _ = initialize(cfg, Transformer(cfg.model), 1, torch.device("cpu"))
    x = torch.randint(0, 8192, (2, 65))
    loss = torch.nn.functional.cross_entropy(engine(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    engine.backward(loss)
    engine.step()  # optimizer state exists, as in a real checkpoint
    saves, loads, copies = [], [], []
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:  # same disk as a run directory
        for i in range(repeats):
            mgr = CheckpointManager(f"{tmp}/run{i}", cfg.checkpoint, 0, 1)
            t0 = time.perf_counter()
            mgr.save(engine, 1, {})
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mgr.load(engine, mgr.latest())  # includes verifying every file's sha256
            loads.append(time.perf_counter() - t0)
            src = Path(tmp) / f"run{i}" / "checkpoints" / "step_1"
            t0 = time.perf_counter()
            shutil.copytree(src, Path(tmp) / f"copy{i}")
            for f in (Path(tmp) / f"copy{i}").iterdir():  # durable, like our save (fsync)
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            copies.append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in src.iterdir())
    best = min
    return {
        "params": param_count(cfg.model),
        "zero_stage": zero_stage,
        "bytes": size,
        "save_s": best(saves),
        "load_s": best(loads),
        "copy_s": best(copies),
        "save_over_copy": best(saves) / best(copies),
        "load_over_copy": best(loads) / best(copies),
    }


def _engine(model: dict, zero_stage: int, micro: int, seq: int):
    """A DeepSpeed engine (world of 1, gloo, fp32) and its training step on random tokens."""
    import torch

    from trainer.config import from_dict
    from trainer.engine import initialize
    from trainer.model import Transformer, param_count
    from trainer.session import Session

    cfg = from_dict(
        {
            "model": {**model, "max_seq_len": seq},
            "data": {"seq_len": seq},
            "cluster": {"num_workers": 1},
            "tracking": {"enabled": False},
            "parallel": {"zero_stage": zero_stage, "micro_batch_size": micro, "global_batch_size": micro},
        }
    )
    Session().ensure_process_group("gloo")
    torch.manual_seed(0)
    engine, _ = initialize(cfg, Transformer(cfg.model), 1, torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (micro, seq + 1))

    def step() -> float:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(engine(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t0

    return cfg, engine, step, param_count(cfg.model)


def stall_sync_vs_async(
    model: dict, zero_stage: int, micro: int, seq: int, repeats: int, plain_steps: int = 6
) -> dict:
    """One engine: steps without a save, `repeats` synchronous saves, then `repeats` + 1 background
    saves, each with the steps that ran while it was in flight (each step polls for the commit, as
    the loop does). The first background save allocates its host memory; the others reuse it."""
    from trainer.checkpoint import CheckpointManager

    cfg, engine, step, params = _engine(model, zero_stage, micro, seq)
    for _ in range(2):
        step()  # warm-up: optimizer state exists, as in a real checkpoint
    plain = [step() for _ in range(plain_steps)]
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:  # same disk as a run directory
        mgr = CheckpointManager(f"{tmp}/run", cfg.checkpoint, 0, 1)
        syncs = []
        for at in range(1, repeats + 1):
            t0 = time.perf_counter()
            mgr.save(engine, at, {})
            syncs.append(time.perf_counter() - t0)
        size = sum(
            f.stat().st_size for f in (Path(tmp) / "run" / "checkpoints" / f"step_{repeats}").iterdir()
        )
        stalls, during, background = [], [], []
        for at in range(repeats + 1, 2 * repeats + 2):
            t0 = time.perf_counter()
            stalls.append(mgr.save_async(engine, at, {}))
            while True:
                during.append(step())
                t_poll = time.perf_counter()
                if mgr.poll() is not None:
                    break
                during[-1] += time.perf_counter() - t_poll  # the per-step check is part of the step
            background.append(time.perf_counter() - t0)
        after = [step() for _ in range(plain_steps)]
    median = statistics.median
    return {
        "params": params,
        "bytes": size,
        "sync_s": median(syncs),
        "first_stall_s": stalls[0],
        "stall_s": median(stalls[1:]),
        "background_s": median(background),
        "step_s": median(plain + after),
        "step_during_s": median(during),
        "steps_during": len(during),
        "repeats": repeats,
    }


QUICK_START = {"vocab_size": 4096, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2}
CPU_100M = {"vocab_size": 16384, "d_model": 768, "n_layers": 12, "n_heads": 12}


def print_stall(which: str = "both") -> None:
    for name, model, micro, seq, repeats in (
        ("quick-start", QUICK_START, 8, 128, 5),
        ("~100M", CPU_100M, 2, 128, 2),
    )[slice(None) if which == "both" else slice(0, 1) if which == "quick" else slice(1, 2)]:
        r = stall_sync_vs_async(model, 3, micro, seq, repeats)
        print(
            f"{name} ({r['params'] / 1e6:.1f}M params, ZeRO-3, checkpoint {r['bytes'] / 2**20:.0f} MiB), "
            f"medians of {r['repeats']} saves each: sync save stalls {r['sync_s']:.3f} s | async stalls "
            f"{r['stall_s']:.3f} s ({100 * r['stall_s'] / r['sync_s']:.1f}% of sync; the first one "
            f"{r['first_stall_s']:.3f} s: allocating its host memory), written+committed in the background "
            f"in {r['background_s']:.2f} s | step {r['step_s']:.3f} s without a save, "
            f"{r['step_during_s']:.3f} s during one ({100 * (r['step_during_s'] / r['step_s'] - 1):+.1f}%, "
            f"{r['steps_during']} steps)",
            flush=True,
        )


def recovery_time(steps: int = 40) -> dict:
    """SIGKILL one Ray Train worker after the first commit; time until the first step after resume,
    split into its phases (wall-clock times, `time.time()`, set against the run's events.jsonl and
    Ray Train's controller log in the session directory of the Ray the run started):

    - detection: the SIGKILL -> the controller's decision to restart the group (its poll of the
      workers saw one dead);
    - group restart: the old group shut down; the new worker processes and actors (a Python process
      each, Ray's and Ray Train's imports); Ray Train's set-up until the new rank 0 is in the
      training function;
    - rank 0's start-up phases of the new attempt (its `startup` event): imports, process groups,
      model, `deepspeed.initialize`, the checkpoint's verification and load (`data_and_resume`),
      tracking, the first step.
    """
    import json

    import psutil

    from tests.data_fixtures import stdlib_corpus
    from tests.run_fixtures import tiny_run

    with tempfile.TemporaryDirectory() as tmp:
        stdlib_corpus(Path(tmp) / "corpus")
        sets = tiny_run(f"{tmp}/corpus", tmp, "rec", steps, "checkpoint.every=5", tracking=True)
        cmd = [sys.executable, "-m", "launch.cli", "train", "configs/tiny-cpu.yaml"]
        cmd += [a for s in sets for a in ("--set", s)]
        load = os.getloadavg()[0]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        events: dict[str, float] = {}
        run_dir = Path(tmp) / "runs" / "rec"
        commit = run_dir / "checkpoints" / "step_5" / "commit.json"

        def train_workers() -> dict[int, psutil.Process]:
            """This run's training workers, from their own records (never another run's on the machine)."""
            found = {}
            for record in (run_dir / "workers").glob("rank*.json"):
                try:
                    pid = json.loads(record.read_text())["pid"]
                    found[pid] = psutil.Process(pid)
                except (OSError, ValueError, KeyError, psutil.Error):
                    pass  # being rewritten, or that process is gone
            return found

        def killer():
            while not commit.exists() and proc.poll() is None:
                time.sleep(0.05)
            old = train_workers()
            victim = json.loads((run_dir / "workers" / "rank1.json").read_text())["pid"]
            if victim not in old:
                return
            events["killed"] = time.time()
            os.kill(victim, signal.SIGKILL)
            survivors = [p for pid, p in old.items() if pid != victim]
            while proc.poll() is None and "group_ended" not in events:
                if not any(p.is_running() for p in survivors):
                    events["group_ended"] = time.time()
                time.sleep(0.02)

        threading.Thread(target=killer, daemon=True).start()
        output = []
        for line in proc.stdout:
            output.append(line)
        proc.wait()
        if proc.returncode != 0 or "killed" not in events:
            return {"error": f"exit {proc.returncode}, events {sorted(events)}: {''.join(output)[-3000:]}"}
        log = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]
        killed = events["killed"]
        after = [e for e in log if e["event"] == "startup" and e["time"] > killed]
        if not after:
            return {"error": f"no start-up after the SIGKILL at {killed:.2f}: {events}, {log}"}
        startup = after[0]  # the restarted group's
        ctl = controller_times(proc.pid, killed)
        return {
            "load_avg_1m": load,
            "detection": ctl.get("retry", float("nan")) - killed,
            "teardown": ctl.get("starting", float("nan")) - ctl.get("retry", float("nan")),
            "worker_processes": ctl.get("created", float("nan")) - ctl.get("starting", float("nan")),
            "ray_train_setup": startup["since"] - ctl.get("created", float("nan")),
            "survivor_ended": events.get("group_ended", float("nan")) - killed,
            **startup["phases_s"],
            "death_to_first_step_s": startup["time"] - killed,
        }


def controller_times(driver_pid: int, since: float) -> dict[str, float]:
    """When Ray Train's controller decided to retry after `since`, and then began starting the new
    group and had its worker actors."""
    from benchmarks.startup import GROUP_MARKS, controller_log_times

    retry = controller_log_times(driver_pid, {"retry": "[FailurePolicy] RETRY"}, since)
    if "retry" not in retry:
        return {}
    return {**retry, **controller_log_times(driver_pid, GROUP_MARKS, retry["retry"])}


RECOVERY_ROWS = [
    ("detection", "detection: SIGKILL -> Ray Train's controller decides to restart"),
    ("teardown", "group restart: old group shut down"),
    ("worker_processes", "group restart: new worker processes and actors (Ray imports)"),
    ("ray_train_setup", "group restart: Ray Train's set-up -> rank 0 in the training function"),
    ("imports", "  rank 0: imports"),
    ("process_group", "  rank 0: process groups"),
    ("model", "  rank 0: model build"),
    ("deepspeed_initialize", "  rank 0: deepspeed.initialize"),
    ("data_and_resume", "  rank 0: checkpoint verify + load, data"),
    ("tracking", "  rank 0: metrics logger, event log"),
    ("first_step", "  rank 0: first step"),
    ("death_to_first_step_s", "SIGKILL -> first step of the restarted group"),
    ("survivor_ended", "(the surviving rank's process ended, after the SIGKILL)"),
]


def print_recovery(repeats: int) -> int:
    runs = [recovery_time() for _ in range(repeats)]
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        print(f"recovery: FAILED ({failed[0]})")
        return 1
    label_w = max(len(label) for _, label in RECOVERY_ROWS)
    print("recovery after SIGKILL of a worker (tiny model, 2 Ray workers), seconds")
    for key, label in RECOVERY_ROWS:
        values = [r.get(key, float("nan")) for r in runs]
        cells = "".join(f"{v:8.2f}" for v in values)
        print(
            f"{label:{label_w}}{cells}{statistics.median(values):9.2f}"
            if len(runs) > 1
            else f"{label:{label_w}}{cells}"
        )
    print(f"{'load average (1 min) at start':{label_w}}" + "".join(f"{r['load_avg_1m']:8.2f}" for r in runs))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--skip-recovery", action="store_true")
    ap.add_argument("--only-stall", action="store_true", help="only the sync vs async save stall")
    ap.add_argument("--stall-models", choices=("both", "quick", "100m"), default="both")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--only-recovery", action="store_true", help="only the restart after a SIGKILL")
    ap.add_argument("--recovery-repeats", type=int, default=1, help="runs of the restart measurement")
    args = ap.parse_args()
    if args.only_recovery:
        return print_recovery(args.recovery_repeats)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.only_stall:
        print_stall(args.stall_models)
        return 0
    for stage in (0, 3):
        r = save_load_vs_copy(args.d_model, args.layers, stage)
        print(
            f"ZeRO-{stage}: {r['params'] / 1e6:.1f}M params, checkpoint {r['bytes'] / 2**20:.0f} MiB: "
            f"save {r['save_s']:.2f} s, load+verify {r['load_s']:.2f} s, plain copy {r['copy_s']:.2f} s -> "
            f"save/copy {r['save_over_copy']:.2f}, load/copy {r['load_over_copy']:.2f}",
            flush=True,
        )
    print_stall(args.stall_models)
    if not args.skip_recovery:
        return print_recovery(args.recovery_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
