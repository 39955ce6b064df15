"""Python's garbage-collection pauses inside training steps: automatic against `train.gc_every`.

One rank of the quick start's model (configs/tiny-cpu.yaml shapes, ZeRO-3 on a gloo world of 1,
`trainer.loop.train` with in-memory batches) logging to a real MLflow store (SQLite), so the
heap holds what a rank's does: torch, DeepSpeed, MLflow, SQLAlchemy. Each setting trains the same
steps; every collection after the first step is timed with `gc.callbacks`, by generation.

With Python's own collector the pauses land wherever allocations cross a threshold, a different
step on each rank, and in data parallelism every other rank waits for each of them at the next
collective: a world of R ranks loses up to R times one rank's pauses. `train.gc_every` puts them
at the same step on every rank, so the world loses one rank's.

    python benchmarks/gc_pauses.py            # ~3 minutes on 2 cores
    python benchmarks/gc_pauses.py --steps 20 # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


MAKE_RUN = """
import sys, tempfile
from pathlib import Path
from cluster.tracking import create_mlflow_run
from trainer.config import load_config
with tempfile.TemporaryDirectory() as run_dir:
    print(create_mlflow_run(load_config(sys.argv[1], sys.argv[2:]), Path(run_dir)))
"""


def batches(vocab: int, seq: int, batch: int, marks: list):
    import torch

    g = torch.Generator().manual_seed(0)
    while True:
        marks.append(time.perf_counter())  # a step asks for its batch
        x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def measure(gc_every: int, steps: int, tracking_uri: str) -> dict:
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.metrics import MlflowLogger

    cfg = load_config(
        "configs/tiny-cpu.yaml",
        [
            "model.vocab_size=4096",
            "cluster.num_workers=1",
            "parallel.global_batch_size=8",
            "parallel.micro_batch_size=8",
            f"train.steps={steps}",
            "train.log_every=10",
            "train.torch_threads=1",
            f"train.gc_every={gc_every}",
            f"tracking.uri={tracking_uri}",
            "checkpoint.save_final=false",
        ],
    )
    marks: list[float] = []

    class Logger(MlflowLogger):
        def close(self) -> None:  # the loop's cleanup: training is over
            marks.append(time.perf_counter())
            super().close()

    # The run is made by another process, as the driver makes it: this one imports MLflow on the
    # logger's thread once the first step is done, as rank 0 does.
    made = subprocess.run(
        [sys.executable, "-c", MAKE_RUN, "configs/tiny-cpu.yaml", f"tracking.uri={tracking_uri}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    logger = Logger(tracking_uri, made.stdout.split()[-1])
    pauses: list[tuple[float, int, float]] = []  # (end time, generation, seconds)
    began: dict = {}

    def on_gc(phase, info):
        if phase == "start":
            began["t"] = time.perf_counter()
        else:
            pauses.append((time.perf_counter(), info["generation"], time.perf_counter() - began["t"]))

    gc.collect()
    gc.callbacks.append(on_gc)
    try:
        t0 = time.perf_counter()
        train(cfg, batches=batches(4096, cfg.data.seq_len, 8, marks), logger=logger)
        wall = time.perf_counter() - t0
    finally:
        gc.callbacks.remove(on_gc)
    # From the second step's batch to the end of the last step.
    after_first = [(g, s) for t, g, s in pauses if marks[1] < t < marks[-1]]
    by_gen: list[list[float]] = [[], [], []]  # pauses of generations 0, 1, 2
    for g, s in after_first:
        by_gen[g].append(s)
    return {"wall": wall, "by_gen": by_gen, "total": sum(s for _, s in after_first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50, help="train.gc_every of the aligned run")
    ap.add_argument("--one", nargs=2, metavar=("GC_EVERY", "TRACKING_URI"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # one setting, in a fresh process: MLflow is imported after the first step, once
        print(json.dumps(measure(int(args.one[0]), args.steps, args.one[1])))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, every in (("automatic (gc_every 0)", 0), (f"aligned (gc_every {args.every})", args.every)):
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--one", str(every)]
            out = subprocess.run([*cmd, f"sqlite:///{tmp}/mlflow.db"], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
            rows.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"Python GC pauses after the first step, {args.steps} steps, one rank (ZeRO-3, MLflow on SQLite)")
    print(f"{'':28}{'collections (gen0/1/2)':>24}{'total ms':>10}{'largest ms':>12}{'run s':>8}")
    for name, r in rows:
        counts = "/".join(str(len(pauses)) for pauses in r["by_gen"])
        largest = max((s for pauses in r["by_gen"] for s in pauses), default=0.0)
        print(f"{name:28}{counts:>24}{r['total'] * 1e3:>10.0f}{largest * 1e3:>12.1f}{r['wall']:>8.1f}")
    auto, aligned = rows[0][1]["total"], rows[1][1]["total"]
    print(
        f"pauses a world of R ranks can lose per {args.steps} steps: automatic up to R x {auto * 1e3:.0f} ms "
        f"(each rank its own steps), aligned {aligned * 1e3:.0f} ms (all ranks at once)"
    )


if __name__ == "__main__":
    main()
