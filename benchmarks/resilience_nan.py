"""Non-finite steps on CPU: what the agreed finite check costs per step, and how long a non-finite
window takes to get past.

1. Check cost: configs/tiny-cpu.yaml's model and layout (ZeRO-3, 2 ranks on gloo, 1 thread each),
   one process per rank; the same engine alternates rounds of steps with the check (before every
   optimizer step: the gradient norm, one all-reduce over the world, one host read) and without it
   (DeepSpeed's own step), the order swapped each round. Figure: median step time with / without.
2. Recovery: a tiny run (tests' tiny model, identity corpus, one process) whose global batches
   12-14 make the loss NaN (the tests' loss patch keyed on sample ids); `train.nonfinite_tolerance`
   3, a commit every 5 steps. Figure: seconds from the start of the first non-finite step to the
   end of the first step trained on samples past the window, beside the plain step time.

    python benchmarks/resilience_nan.py          # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _check_cost_rank(rank: int, world: int, rounds: int, steps: int) -> dict:
    import torch

    from tests.run_fixtures import tiny_config
    from trainer import library_internals, loop
    from trainer.session import Session

    cfg = tiny_config(
        model={"arch": "llama", "vocab_size": 4096, "d_model": 128, "n_layers": 4, "max_seq_len": 128},
        data={"seq_len": 128},
        parallel={"zero_stage": 3, "micro_batch_size": 8, "global_batch_size": 16},
        optim={"fused": True},
        train={"steps": 10_000, "log_every": 10_000},
        cluster={"num_workers": world},
    )
    g = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, 4096, (8, 129), generator=g) for _ in range(4)]
    micro = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
    session = Session(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    times: dict[bool, list[float]] = {True: [], False: []}
    checks: list[float] = []  # the check's own seconds (the norm, the all-reduce, the host read)
    with ExitStack() as cleanup:
        t = loop.build(cfg, session, cleanup, batches=iter(()))

        def timed_check() -> bool:
            t0 = time.perf_counter()
            apply = t.anomaly.check()
            checks.append(time.perf_counter() - t0)
            return apply

        step = 0
        for r in range(rounds + 1):  # round 0 warms up
            for checked in (True, False) if r % 2 else (False, True):
                if checked:
                    library_internals.guard_model_step(t.engine, timed_check)
                else:
                    vars(t.engine).pop("_take_model_step", None)  # DeepSpeed's own step again
                for _ in range(steps):
                    t0 = time.perf_counter()
                    loop.train_step(t, step, [micro[step % len(micro)]])
                    if r:
                        times[checked].append(time.perf_counter() - t0)
                    step += 1
    return {**{k: statistics.median(v) for k, v in times.items()}, "check_s": statistics.median(checks)}


def check_cost(rounds: int = 30, steps: int = 1, world: int = 2) -> dict:
    """Median step time with and without the finite check, side by side on the same engines."""
    from tests.test_tensor_parallel import run_world

    with tempfile.TemporaryDirectory() as tmp:
        per_rank = run_world(world, Path(tmp), _check_cost_rank, rounds, steps)
    with_check, without = per_rank[0][True], per_rank[0][False]
    check_s = max(r["check_s"] for r in per_rank)
    return {
        "step_s_with_check": with_check,
        "step_s_without": without,
        "ratio": with_check / without,
        "check_s": check_s,  # inside the step: its share is a floor under the ratio's noise
        "check_share": check_s / without,
    }


def recovery_seconds(window: tuple[int, int] = (12, 15)) -> dict:
    """Seconds from the first non-finite step to the first step past the window (one process)."""
    from tests.data_fixtures import identity_corpus
    from tests.run_fixtures import tiny_config
    from tests.test_anomaly import BLOCK, GB, _step_ids, _stream, poisoned_samples
    from trainer import loop
    from trainer.session import Session

    with tempfile.TemporaryDirectory() as tmp:
        corpus = str(Path(tmp) / "corpus")
        identity_corpus(Path(corpus), train_blocks=256, samples_per_shard=16, block_len=BLOCK)
        ids = {i for s in _step_ids(_stream(corpus), window[0], window[1] - window[0]) for i in s}
        cfg = tiny_config(
            model={"max_seq_len": BLOCK - 1},
            data={"path": corpus, "seq_len": BLOCK - 1},
            parallel={"micro_batch_size": 4, "global_batch_size": GB},
            train={"steps": 20, "nonfinite_tolerance": 3, "seed": 7, "log_every": 100},
            checkpoint={"every": 5, "keep": 2},
        )
        real, calls = loop.train_step, []

        def timed(t, step, micro):
            t0 = time.perf_counter()
            out = real(t, step, micro)
            u = t.anomaly.skip.unskipped_step(step) if t.anomaly.verdict == "ok" else -1
            calls.append((t0, time.perf_counter(), t.anomaly.verdict, u))
            return out

        loop.train_step = timed
        try:
            with poisoned_samples(ids):
                loop.train(cfg, Session(run_dir=tmp))
        finally:
            loop.train_step = real
    first_bad = next(c[0] for c in calls if c[2] == "nonfinite")
    past = next(c[1] for c in calls if c[0] > first_bad and c[2] == "ok" and c[3] >= window[1])
    plain = statistics.median(c[1] - c[0] for c in calls[1:] if c[2] == "ok")
    return {"seconds_past_window": past - first_bad, "plain_step_s": plain, "steps_run": len(calls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=1, help="steps per round and side")
    args = ap.parse_args()
    cost = check_cost(args.rounds, args.steps)
    print(
        f"finite check: {cost['step_s_with_check'] * 1e3:.1f} ms/step with, "
        f"{cost['step_s_without'] * 1e3:.1f} ms/step without: ratio {cost['ratio']:.3f} (goal <= 1.01); "
        f"the check itself {cost['check_s'] * 1e3:.2f} ms = {cost['check_share']:.3f} of a step"
    )
    rec = recovery_seconds()
    print(
        f"non-finite window (3 steps, tolerance 3, commit every 5): past it in "
        f"{rec['seconds_past_window']:.2f} s ({rec['steps_run']} step calls; a plain step "
        f"{rec['plain_step_s'] * 1e3:.0f} ms)"
    )


if __name__ == "__main__":
    main()
