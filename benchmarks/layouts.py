"""Throughput of each parallel layout relative to plain data parallelism on the same world size.

Every layout trains the same tiny LLaMA-style model on the same random tokens through the real
path (`trainer.loop.train`: plan, DeepSpeed engine, pipeline engine under PP) for a few steps in a
spawned world (a FileStore rendezvous, like the multi-rank tests); the first step (engine warm-up,
allocations) is dropped and tokens/s is the global batch's tokens over the remaining step times.
All layouts of one world size run in ONE spawned world, one after the other, so the import is
paid once per world. Ratios are against dp-only ZeRO-0 of the same world size:

    world 2: dp2 ZeRO-1/2/3, tp2 ZeRO-0, pp2 ZeRO-1        against dp2 ZeRO-0
    world 4: tp2 x dp2 ZeRO-3, pp2 x dp2 ZeRO-1, tp2 x pp2  against dp4 ZeRO-0

On CPU (gloo, fp32, one thread per rank) this measures the communication and bookkeeping cost
of each layout on a model far too small to need it: a check of overheads, not a forecast of
GPU scaling. With --device cuda (nccl, bf16) only the worlds that fit the visible GPUs run (one
rank per GPU); on one GPU that is world 1 only, which has no layouts to compare.

    python benchmarks/layouts.py                     # CPU, worlds 2 and 4, ~10 steps, a few minutes
    python benchmarks/layouts.py --device cuda       # the worlds that fit the visible GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.run_fixtures import LAYOUTS as TESTED  # noqa: E402  (the parity matrix's layouts)
from tests.run_fixtures import tiny_config  # noqa: E402

# name -> (world, zero stage, tp, pp); the first layout of each world is its dp-only baseline.
LAYOUTS = {"dp2-zero0": (2, 0, 1, 1), "dp4-zero0": (4, 0, 1, 1)} | TESTED
SINGLE = {"dp1-zero0": (1, 0, 1, 1)}  # one GPU: nothing else fits


def layout_config(zero_stage: int, tp: int, pp: int, world: int, device: str, steps: int, model: dict):
    """The tests' tiny config with the benchmark's model under one layout: micro 2, global 16
    sequences of 64 tokens, so a pipeline has at least 4 micro batches to overlap at dp=2."""
    return tiny_config(
        model={"arch": "llama", "vocab_size": 256, "max_seq_len": 64, **model},
        data={"seq_len": 64},
        parallel={
            "zero_stage": zero_stage,
            "tp": tp,
            "pp": pp,
            "micro_batch_size": 2,
            "global_batch_size": 16,
        },
        optim={"lr": 1e-3},
        train={"steps": steps, "device": device, "precision": "fp32" if device == "cpu" else "bf16"},
        cluster={"num_workers": world},
        checkpoint={"save_final": False},
    )


def random_batches(seed: int, dp_rank: int, dp: int, micro: int, global_batch: int, seq_len: int, vocab: int):
    """Micro batches of one DP rank: global sample g of each step goes to DP rank g % dp."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        seq = torch.randint(0, vocab, (global_batch, seq_len + 1), generator=g)[dp_rank::dp]
        for i in range(0, len(seq), micro):
            yield seq[i : i + micro, :-1], seq[i : i + micro, 1:]


class StepTimes:
    """A logger that keeps each logged step's time (log_every is 1: every step)."""

    def __init__(self):
        self.step_time_s: dict[int, float] = {}

    def log(self, metrics: dict, step: int) -> None:
        if "step_time_s" in metrics:
            self.step_time_s[step] = metrics["step_time_s"]

    def flush(self, timeout_s: float = 0.0) -> None:
        pass

    def close(self) -> None:
        pass


def run_layouts(rank: int, world: int, names: list[str], device: str, steps: int, model: dict) -> dict:
    """Every layout in `names` on this rank, in turn: name -> tokens/s over steps 2..N."""
    import torch.distributed as dist

    from trainer.loop import train
    from trainer.parallel.topology import Topology
    from trainer.session import Session

    out = {}
    for name in names:
        _, zero_stage, tp, pp = (LAYOUTS | SINGLE)[name]
        cfg = layout_config(zero_stage, tp, pp, world, device, steps, model)
        topo = Topology(world, rank, tp, pp)
        p = cfg.parallel
        batches = random_batches(
            0, topo.dp_rank, topo.dp, p.micro_batch_size, p.global_batch_size, cfg.data.seq_len, 256
        )
        times = StepTimes()
        dist.barrier()
        train(cfg, Session(rank, world, rank, world), batches=batches, logger=times)
        steady = [t for s, t in times.step_time_s.items() if s > 1]  # drop the first step
        out[name] = p.global_batch_size * cfg.data.seq_len * len(steady) / sum(steady)
    return out


def _worker(rank: int, world: int, tmp: str, device: str, names: list[str], steps: int, model: dict) -> None:
    import torch
    import torch.distributed as dist

    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(rank)
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    backend = "gloo" if device == "cpu" else "nccl"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        result = run_layouts(rank, world, names, device, steps, model)
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_world(world: int, names: list[str], device: str, steps: int, model: dict) -> dict[str, float]:
    """Spawn `world` ranks that run `names`; rank 0's tokens/s per layout (every rank times the
    same synchronised steps)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(world, tmp, device, names, steps, model), nprocs=world, start_method="spawn"
        )
        with open(os.path.join(tmp, "rank0.json")) as f:
            return json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=10, help="steps per layout; the first is dropped")
    ap.add_argument("--worlds", default="2,4", help="comma-separated world sizes to run (2, 4)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is dropped)")
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": 4}
    worlds = [int(w) for w in args.worlds.split(",")]

    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            print("--device cuda: no GPU is visible", file=sys.stderr)
            return 2
        fits = [w for w in worlds if w <= gpus]
        if not fits:
            print(
                f"{gpus} GPU visible: only world 1 fits (one rank per GPU), which has no parallel layout to "
                "compare; printing its tokens/s alone"
            )
            tps = run_world(1, list(SINGLE), "cuda", args.steps, model)
            print(f"  dp1-zero0: {tps['dp1-zero0']:,.0f} tokens/s ({args.steps - 1} steps after the first)")
            return 0
        if len(fits) < len(worlds):
            print(f"{gpus} GPUs visible: running world(s) {fits} only")
        worlds = fits

    rows = []
    for world in worlds:
        names = [n for n, layout in LAYOUTS.items() if layout[0] == world]
        print(f"== world {world} ({args.device}): {', '.join(names)}", flush=True)
        tps = run_world(world, names, args.device, args.steps, model)
        base = tps[names[0]]
        rows += [(world, n, tps[n], tps[n] / base, names[0]) for n in names]

    print(f"\n{'layout':15s} {'world':>5s} {'tokens/s':>10s}  ratio vs dp-only (same world)")
    for world, name, tps, ratio, base in rows:
        print(f"{name:15s} {world:>5d} {tps:>10,.0f}  {ratio:5.2f}  ({base})")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    dict(zip(("world", "layout", "tokens_per_s", "ratio", "baseline"), r, strict=True))
                    for r in rows
                ]
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
