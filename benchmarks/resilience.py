"""Resilience on CPU, in one run: the cost of the agreed finite check per step and the seconds from
a non-finite window to training past it (benchmarks/resilience_nan.py measures both), and the
seconds from a rank that stops for good to the restarted worker group's first step (below).

Runs `pretrain train configs/tiny-cpu.yaml` (local Ray, 2 workers, ZeRO-3, a checkpoint every 4
steps) on the test corpus; rank 1 holds at step 10 (tests/fault_hooks' stall hook) and is then
SIGSTOPped, so it can run nothing. The hang watchdog (cluster/watchdog.py) dumps the stacks and ends
the group; Ray Train restarts it from the newest commit. Printed, from the SIGSTOP:

- detected: the watchdog's `hang` event (train.hang_timeout_s, then at most one poll);
- restarted: the new attempt's `start` event (the group ended, Ray Train's restart, worker start-up
  up to the loop's build);
- first step: the new attempt's `startup` event (model, engine, resume from the commit, one step).

    python benchmarks/resilience.py --hang-timeout 10     # ~3 minutes on 2 cores
    python benchmarks/resilience.py --only hang           # or --only nan
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.data_fixtures import stdlib_corpus  # noqa: E402
from tests.run_fixtures import hooked_env, tiny_run  # noqa: E402
from trainer.events import EventLog  # noqa: E402


def stuck_rank_to_first_step(work: Path, corpus: str, hang_timeout_s: float) -> dict:
    """One run with rank 1 stopped at step 10; seconds from the SIGSTOP to each mark."""
    args = tiny_run(
        corpus,
        work,
        "stuck",
        16,
        "checkpoint.every=4",
        f"train.hang_timeout_s={hang_timeout_s}",
        tracking=False,
    )
    cmd = [sys.executable, "-m", "launch.cli", "train", "configs/tiny-cpu.yaml"]
    cmd += [x for a in args for x in ("--set", a)]
    env = {**os.environ, **hooked_env(PRETRAIN_TEST_STALL_AT="9:1")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = work / "runs" / "stuck"
    while not (run_dir / "test-stalled").exists():
        if proc.poll() is not None:
            raise SystemExit(proc.communicate()[1][-3000:])
        time.sleep(0.05)
    pid = json.loads((run_dir / "workers" / "rank1.json").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    stopped = time.time()
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(err[-3000:])
    events = EventLog(str(run_dir)).read()
    hang = next(e for e in events if e["event"] == "hang")
    start = [e for e in events if e["event"] == "start"][1]
    startup = [e for e in events if e["event"] == "startup"][1]
    return {
        "hang_timeout_s": hang_timeout_s,
        "detected_s": round(hang["time"] - stopped, 2),
        "restarted_s": round(start["time"] - stopped, 2),
        "first_step_s": round(startup["time"] - stopped, 2),
        "behind": hang["behind"],
        "resumed_from": start["resumed_from"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hang-timeout", type=float, default=10.0, help="train.hang_timeout_s of the run")
    ap.add_argument("--rounds", type=int, default=30, help="finite check: rounds with and without it")
    ap.add_argument("--only", choices=("nan", "hang"), default="", help="one of the two parts")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args()
    out: dict = {}
    if a.only != "hang":
        from benchmarks.resilience_nan import check_cost, recovery_seconds

        out["finite_check"] = cost = check_cost(a.rounds)
        print(
            f"finite check: {cost['step_s_with_check'] * 1e3:.1f} ms/step with, "
            f"{cost['step_s_without'] * 1e3:.1f} ms/step without: ratio {cost['ratio']:.3f} (goal <= 1.01); "
            f"the check itself {cost['check_s'] * 1e3:.2f} ms = {cost['check_share']:.3f} of a step"
        )
        out["nonfinite_window"] = rec = recovery_seconds()
        print(
            f"non-finite window (3 steps, tolerance 3, commit every 5): past it in "
            f"{rec['seconds_past_window']:.2f} s ({rec['steps_run']} step calls; a plain step "
            f"{rec['plain_step_s'] * 1e3:.0f} ms)"
        )
    if a.only != "nan":
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            stdlib_corpus(work / "corpus")
            out["stuck_rank"] = r = stuck_rank_to_first_step(work, str(work / "corpus"), a.hang_timeout)
        print(
            f"stuck rank {r['behind']} (SIGSTOP at step 10, hang timeout {r['hang_timeout_s']:.0f}s): "
            f"detected after {r['detected_s']:.1f}s, group restarted after {r['restarted_s']:.1f}s, "
            f"first step of the restarted group (resumed from step {r['resumed_from']}) after {r['first_step_s']:.1f}s"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
