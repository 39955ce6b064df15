"""Framework overhead on CPU, measured side by side in one run.

The same tiny model (configs/tiny-cpu.yaml shapes), batch, seed and thread count, run
(a) as a plain PyTorch loop (torch AdamW, fused when the config's is, no Ray, no DeepSpeed,
in-memory batches) and (b) through `pretrain train` with 1 Ray worker, ZeRO 0 and ZeRO 3 (the
whole product path: Ray Train, DeepSpeed, streamed shards, MLflow). Reports steady-state
tokens/s of (b) over (a): (a) after 3 warm-up steps; (b) from its logged windows after the first
(steps 2-10 end the start-up: rank 0 imports MLflow and opens its store and system metrics on
their threads meanwhile), with the first window and the whole run after step 1 shown beside it.
Each of ours runs between two runs of the plain loop, `--rounds` times; the median ratio is the
figure. Start-up itself: benchmarks/startup.py.

    python benchmarks/overhead.py        # ~6 minutes on 2 cores (3 rounds)
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


def pretrain_run(
    tmp: str, corpus: str, zero: int, round_: int, steps: int, threads: int, mb: int, log_every: int
) -> dict:
    name = f"zero{zero}-{round_}"
    sets = [
        f"data.path={corpus}",
        "cluster.num_workers=1",
        f"cluster.cpus_per_worker={threads}",
        f"train.torch_threads={threads}",
        f"parallel.zero_stage={zero}",
        f"parallel.micro_batch_size={mb}",
        f"parallel.global_batch_size={mb}",
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--log-every", type=int, default=10, help="steps per logged window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="plain/ours pairs per ZeRO stage (median)")
    args = ap.parse_args()
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
        torch.set_num_threads(args.threads)

        def plain() -> float:
            return plain_pytorch_tokens_per_s(
                cfg.model,
                batch=args.micro_batch,
                seq_len=cfg.data.seq_len,
                steps=args.steps,
                warmup=3,
                device="cpu",
                bf16=False,
                compile_blocks=False,
                lr=cfg.optim.lr,
                fused=cfg.optim.fused,  # the optimizer kernel ours runs
            )

        # A shared VM's speed drifts by 10-15% from minute to minute: the plain loop runs before
        # and after each of ours, and each ratio is against the mean of the two around it. One
        # such pair cannot resolve a few percent, so there are `--rounds` of them; the median
        # ratio is the figure.
        plains, rows = [plain()], {0: [], 3: []}
        for n in range(args.rounds):
            for z in rows:
                r = pretrain_run(
                    tmp, f"{tmp}/corpus", z, n, args.steps, args.threads, args.micro_batch, args.log_every
                )
                plains.append(plain())
                rows[z].append({**r, "base": (plains[-2] + plains[-1]) / 2})
    print(
        f"plain PyTorch loop ({args.threads} threads, micro batch {args.micro_batch}): "
        + ", ".join(f"{p:,.0f}" for p in plains)
        + " tokens/s (before, between and after each of ours)"
    )
    for z, runs in rows.items():
        ratios = [r["tokens_per_s"] / r["base"] for r in runs]
        print(
            f"pretrain train, 1 worker, ZeRO-{z}: median ratio {statistics.median(ratios):.3f} "
            f"over {len(runs)} rounds"
        )
        for r, ratio in zip(runs, ratios, strict=True):
            print(
                f"  {r['tokens_per_s']:,.0f} tokens/s -> ratio {ratio:.3f} (against {r['base']:,.0f}); "
                f"steps 2-{args.log_every} (start-up's tail) {r['first_window']:,.0f}, "
                f"whole run after step 1 {r['whole_run']:,.0f} (ratio {r['whole_run'] / r['base']:.3f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
