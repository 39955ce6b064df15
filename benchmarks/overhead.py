"""Framework overhead on CPU, measured side by side in one run.

The same tiny model (configs/tiny-cpu.yaml shapes), batch, seed and thread count, run
(a) as a plain PyTorch loop (torch AdamW, fused when the config's is, no Ray, no DeepSpeed,
in-memory batches) and (b) through `pretrain train` (the whole product path: Ray Train, DeepSpeed,
streamed shards, MLflow). The comparisons (`--only` picks some):

- zero0, zero3 (zero3 only when asked): 1 Ray worker of `--threads` threads at micro batch
  `--micro-batch`, ZeRO 0 or 3, against the plain loop on the same threads and batch;
- quickstart: configs/tiny-cpu.yaml as the README quick start runs it (ZeRO-3, 2 workers of 1
  thread, global batch 16), against the plain loop on 2 threads at batch 16.

Reports steady-state tokens/s of (b) over (a): (a) after 3 warm-up steps; (b) from its logged
windows after the first (steps 2-10 end the start-up: rank 0 imports MLflow and opens its store and
system metrics on their threads meanwhile), with the first window and the whole run after step 1
shown beside it. Each of ours runs between two runs of the plain loop of its shape, `--rounds`
times; the median ratio is the figure. Start-up itself: benchmarks/startup.py.

    python benchmarks/overhead.py --rounds 5     # zero0 and quickstart; a quiet 2-core machine: < 12 min
    python benchmarks/overhead.py --only zero0,zero3,quickstart
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMPARISONS = ("zero0", "zero3", "quickstart")


def pretrain_run(tmp: str, corpus: str, name: str, steps: int, log_every: int, sets: list[str]) -> dict:
    """`pretrain train configs/tiny-cpu.yaml` with `sets` on top; its steady-state tokens/s."""
    sets = [
        f"data.path={corpus}",
        *sets,
        f"train.steps={steps}",
        f"train.log_every={log_every}",
        "checkpoint.save_final=false",
        f"cluster.run_name={name}",
        f"cluster.storage_path={tmp}/runs",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
    ]
    cmd = [sys.executable, "-m", "launch.cli", "train", "configs/tiny-cpu.yaml"]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"pretrain train failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    # The log line of every `log_every` steps carries that window's tokens/s. The first window is
    # the end of start-up: rank 0's MLflow store opens on the logger's thread meanwhile.
    windows = [float(m) for m in re.findall(r"step \d+ \|.*?\| tokens_per_s ([\d.e+]+)", proc.stdout)][1:]
    steady = windows[1:]  # equal windows: total tokens over total time is their harmonic mean
    summary = json.loads((Path(tmp) / "runs" / name / "summary.json").read_text())
    return {
        "tokens_per_s": len(steady) / sum(1 / w for w in steady),
        "first_window": windows[0],
        "whole_run": summary["tokens_per_s"],
    }


def comparison(kind: str, args) -> tuple[str, list[str], tuple[int, int]]:
    """A comparison's title, its `--set` items and the plain loop's (threads, batch) beside it."""
    if kind == "quickstart":
        # tiny-cpu.yaml as shipped; its threads pinned so that a bigger machine runs the same layout
        return (
            "quick start (ZeRO-3, 2 workers of 1 thread, global batch 16)",
            ["train.torch_threads=1"],
            (2, 16),
        )
    zero = int(kind[-1])
    sets = [
        "cluster.num_workers=1",
        f"cluster.cpus_per_worker={args.threads}",
        f"train.torch_threads={args.threads}",
        f"parallel.zero_stage={zero}",
        f"parallel.micro_batch_size={args.micro_batch}",
        f"parallel.global_batch_size={args.micro_batch}",
    ]
    return f"1 worker, ZeRO-{zero}", sets, (args.threads, args.micro_batch)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="steps of each `pretrain train` run")
    ap.add_argument("--plain-steps", type=int, default=20, help="timed steps of each plain loop run")
    ap.add_argument("--log-every", type=int, default=10, help="steps per logged window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="plain/ours pairs per comparison (median)")
    ap.add_argument(
        "--only",
        default="zero0,quickstart",  # the two with goals (#25); zero3 is 1 worker at ZeRO-3
        help=f"comma-separated, of {', '.join(COMPARISONS)}",
    )
    args = ap.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    if not kinds or any(k not in COMPARISONS for k in kinds):
        ap.error(f"--only takes some of {', '.join(COMPARISONS)}, got {args.only!r}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from benchmarks.common import plain_pytorch_tokens_per_s
    from trainer.config import load_config
    from trainer.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        stdlib = Path(os.path.dirname(os.__file__))
        files = sorted(str(p) for p in stdlib.glob("*.py"))[:60]
        prepare(files, f"{tmp}/corpus", vocab_size=4096, block_len=129, workers=2)
        cfg = load_config(
            ROOT / "configs/tiny-cpu.yaml", [f"data.path={tmp}/corpus", "model.vocab_size=4096"]
        )

        def plain(shape: tuple[int, int]) -> float:
            threads, batch = shape
            torch.set_num_threads(threads)
            tps = plain_pytorch_tokens_per_s(
                cfg.model,
                batch=batch,
                seq_len=cfg.data.seq_len,
                steps=args.plain_steps,
                warmup=3,
                device="cpu",
                bf16=False,
                compile_blocks=False,
                lr=cfg.optim.lr,
                fused=cfg.optim.fused,  # the optimizer kernel ours runs
            )
            plains.setdefault(shape, []).append(tps)
            return tps

        # A shared VM's speed drifts by 10-15% from minute to minute: the plain loop of the same
        # shape runs right before and after each of ours, and each ratio is against the mean of the
        # two around it. One such pair cannot resolve a few percent, so there are `--rounds` of
        # them; the median ratio is the figure. Every other round runs the comparisons in reverse
        # order, so one plain run sits between two of ours of the same shape.
        plains: dict[tuple[int, int], list[float]] = {}
        rows: dict[str, list[dict]] = {k: [] for k in kinds}
        last: tuple[tuple[int, int], float] | None = (
            None  # the run just before: a plain one's shape, tokens/s
        )
        for n in range(args.rounds):
            for kind in kinds if n % 2 == 0 else kinds[::-1]:
                _, sets, shape = comparison(kind, args)
                before = last[1] if last is not None and last[0] == shape else plain(shape)
                load = load_average()
                r = pretrain_run(tmp, f"{tmp}/corpus", f"{kind}-{n}", args.steps, args.log_every, sets)
                after = plain(shape)
                last = (shape, after)
                rows[kind].append({**r, "base": (before + after) / 2, "load": load})
    for (threads, batch), runs in plains.items():
        print(
            f"plain PyTorch loop ({threads} threads, batch {batch}): "
            + ", ".join(f"{p:,.0f}" for p in runs)
            + " tokens/s (before, between and after each of ours)"
        )
    for kind, runs in rows.items():
        ratios = [r["tokens_per_s"] / r["base"] for r in runs]
        print(
            f"pretrain train, {comparison(kind, args)[0]}: median ratio {statistics.median(ratios):.3f} "
            f"over {len(runs)} rounds"
        )
        for r, ratio in zip(runs, ratios, strict=True):
            print(
                f"  {r['tokens_per_s']:,.0f} tokens/s -> ratio {ratio:.3f} (against {r['base']:,.0f}); "
                f"steps 2-{args.log_every} (start-up's tail) {r['first_window']:,.0f}, "
                f"whole run after step 1 {r['whole_run']:,.0f} (ratio {r['whole_run'] / r['base']:.3f}); "
                f"load average {r['load']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
