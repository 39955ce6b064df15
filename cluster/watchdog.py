"""The hang watchdog: a thread of the driver that watches every rank's progress record
(trainer/watchdog.py) from outside the ranks, so it sees a rank that can run no Python at all.

When no rank has finished a step for the timeout (train.hang_timeout_s; before the first step of an
attempt and while a rank checkpoints or evaluates, train.hang_startup_timeout_s), it writes
`<run>/hangs/<time>/`: every rank's Python stacks (`py-spy dump`, run on the rank's node) and
`summary.json` with each rank's step, phase and process state and the rank(s) behind; then a
`hang` event and an MLflow artifact, and it SIGKILLs every rank of the group, which Ray Train
restarts from the newest commit (a failure counted against cluster.max_failures).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cluster.library_internals import ControllerCallback
from trainer.config import Config
from trainer.events import EventLog
from trainer.progress import LONG_PHASES, PHASES, group_stopped, read_progress

log = logging.getLogger("pretrain")
STUCK_STATES = ("stopped", "tracing-stop", "zombie", "dead", "disk-sleep")  # psutil's names


def hang_timeout(cfg: Config, records: list[dict]) -> float:
    """Seconds without a finished step that count as a hang, given the ranks' progress records."""
    t = cfg.train
    if any(r["steps_done"] == 0 or r["phase"] in LONG_PHASES for r in records):
        return t.hang_startup_timeout_s
    if t.hang_timeout_s:
        return t.hang_timeout_s
    median = sorted(r["median_step_s"] for r in records)[len(records) // 2]
    return max(t.hang_timeout_floor_s, t.hang_step_multiple * median)


def behind(records: list[dict]) -> list[int]:
    """The ranks furthest behind: the lowest (step, phase), or, when all are level, every rank."""
    order = {p: i for i, p in enumerate(PHASES)}

    def key(r):
        return (r["step"], order.get(r["phase"], len(PHASES)))

    low = min(key(r) for r in records)
    ranks = [r["rank"] for r in records if key(r) == low]
    return ranks


def _dump_stacks(pid: int) -> str:
    """`py-spy dump` of a process of this node, without pausing it (it reads the memory of a
    stopped process too); what went wrong instead, when it cannot."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    try:
        out = subprocess.run(
            [spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"py-spy dump --pid {pid} failed: {e}\n"
    return out.stdout + (f"\n[py-spy exit {out.returncode}] {out.stderr}" if out.returncode else "")


def _process_state(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).status()
    except psutil.Error as e:
        return f"gone ({type(e).__name__})"


def _inspect(pid: int) -> tuple[str, str]:
    """On the rank's node: its process state and Python stacks."""
    return _process_state(pid), _dump_stacks(pid)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)  # works on a stopped process too


def _on_node(node_id: str, here: str, fn, *args):
    """`fn(*args)` on Ray node `node_id`: in this process when that is this node, else as a task there."""
    if not node_id or node_id == here:
        return fn(*args)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))(fn)
    return ray.get(task.remote(*args), timeout=60)


class HangWatchdog:
    """Polls the ranks' progress records every `poll_s`; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: Path, on_hang=None, poll_s: float = 1.0):
        self.cfg, self.run_dir, self.poll_s = cfg, Path(run_dir), poll_s
        self.on_hang = on_hang  # called with the hang directory (the driver logs it to MLflow)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
        self.attempt: tuple = ()  # the pids of the group being watched
        self.armed_at = 0.0
        self.handled = False
        self.hangs: list[Path] = []

    def start(self) -> HangWatchdog:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=120)

    def _run(self) -> None:
        while not self.stopping.wait(self.poll_s):
            try:
                self.check(time.time())
            except Exception as e:  # the watchdog must never end the run itself
                log.warning("hang watchdog: %s", e)

    def _group(self) -> tuple[list[dict], dict[int, dict]] | None:
        """This attempt's progress records and worker records, when every rank has both."""
        workers, records = {}, []
        try:  # the size of the group now running (an elastic run's changes), from its rank 0
            world = json.loads((self.run_dir / "workers" / "rank0.json").read_text())["world_size"]
        except (OSError, ValueError, KeyError):
            return None
        for rank in range(world):
            try:
                workers[rank] = json.loads((self.run_dir / "workers" / f"rank{rank}.json").read_text())
            except (OSError, ValueError):
                return None
            record = read_progress(str(self.run_dir), rank)
            if record is None or record.get("pid") != workers[rank].get("pid"):
                return None  # not started yet, or an earlier attempt's record
            records.append(record)
        return records, workers

    def check(self, now: float) -> Path | None:
        """One look at the group; the hang directory when this look found a hang."""
        group = self._group()
        if group is None or group_stopped(str(self.run_dir)) is not None:  # ending already
            return None
        records, workers = group
        attempt = tuple(r["pid"] for r in records)
        if attempt != self.attempt:  # a new (or restarted) group: start-up time counts from here
            self.attempt, self.armed_at, self.handled = attempt, now, False
        if self.handled:
            return None
        last = max([self.armed_at] + [r["step_done_at"] for r in records])
        last = max([last] + [r["phase_since"] for r in records if r["phase"] in LONG_PHASES])
        timeout = hang_timeout(self.cfg, records)
        if now - last <= timeout:
            return None
        self.handled = True
        return self._act(records, workers, now - last, timeout)

    def _act(self, records: list[dict], workers: dict[int, dict], stalled_s: float, timeout: float) -> Path:
        """Dump, record and end the group."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out = self.run_dir / "hangs" / stamp
        out.mkdir(parents=True, exist_ok=True)
        here = _this_node()
        late = behind(records)
        ranks = {}
        for r in records:  # dumps first, for every rank, before any rank is killed
            w = workers[r["rank"]]
            try:
                state, stacks = _on_node(w.get("node_id", ""), here, _inspect, r["pid"])
            except Exception as e:
                state, stacks = "unknown", f"could not inspect rank {r['rank']} on {w.get('hostname')}: {e}\n"
            (out / f"rank{r['rank']}.txt").write_text(
                f"rank {r['rank']} pid {r['pid']} on {w.get('hostname')}: step {r['step'] + 1}, phase "
                f"{r['phase']} for {time.time() - r['phase_since']:.1f}s, process {state}\n\n{stacks}"
            )
            ranks[str(r["rank"])] = {
                "pid": r["pid"],
                "host": w.get("hostname"),
                "step": r["step"] + 1,
                "phase": r["phase"],
                "phase_s": round(time.time() - r["phase_since"], 1),
                "steps_done": r["steps_done"],
                "process": state,
            }
        # A process that cannot run (stopped, zombie, gone) is the one behind, whatever its record says.
        stuck = [int(k) for k, v in ranks.items() if v["process"] in STUCK_STATES]
        late = stuck or late
        summary = {
            "behind": late,
            "stalled_s": round(stalled_s, 1),
            "timeout_s": round(timeout, 1),
            "ranks": ranks,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        names = ", ".join(
            f"rank {k} ({ranks[str(k)]['phase']} of step {ranks[str(k)]['step']})" for k in late
        )
        log.warning(
            "hang: no rank finished a step for %.0fs (timeout %.0fs); behind: %s; stacks in %s; "
            "restarting the worker group",
            stalled_s,
            timeout,
            names,
            out,
        )
        EventLog(str(self.run_dir)).write(
            "hang", behind=late, stalled_s=summary["stalled_s"], timeout_s=summary["timeout_s"], dump=str(out)
        )
        if self.on_hang is not None:
            try:
                self.on_hang(out)
            except Exception as e:
                log.warning("hang watchdog: could not record %s: %s", out, e)
        for r in records:
            w = workers[r["rank"]]
            try:
                _on_node(w.get("node_id", ""), here, _kill, r["pid"])
            except Exception as e:  # already gone, or its node is: Ray Train notices either way
                log.info("hang watchdog: rank %d (pid %d): %s", r["rank"], r["pid"], e)
        self.hangs.append(out)
        return out


def _this_node() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:
        return ""


class StopRecordCheckBeforeStart(ControllerCallback):
    """Runs in the Ray Train controller: before each (re)start of the worker group, refuses when a
    rank recorded a failure that a restart would repeat (trainer.progress.record_group_stop: out of
    memory). `fit()` then raises, and the driver reports the recorded failure."""

    def __init__(self, run_dir: Path):
        self.run_dir = str(run_dir)

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        record = group_stopped(self.run_dir)
        if record is not None:
            raise RuntimeError(f"not restarting the worker group: {record.get('message', record)}")
