"""What MLflow logging costs the training step (target: step time on/off < 1.01), two ways, on
the same tiny model and random tokens, metrics logged every step into a real MLflow run:

- `steps` (default): one process trains the model with a plain PyTorch step and alternates
  blocks of steps with `MlflowLogger.log()` after each step and blocks without, so slow drifts
  of a shared machine's load hit both modes alike; ratio of the median step times, and of the
  process CPU time per step with the logger thread's work included.
- `train`: `trainer.loop.train` (DeepSpeed engine, our loop) run whole, alternately with a
  NullLogger and an MlflowLogger; ratio of the median steady-state step times (coarser: a
  busy machine's noise between runs is larger than the effect).

Also prints what one `log()` call costs the training thread.

    python benchmarks/tracking.py                               # SQLite store in a temp dir, < 1 min
    python benchmarks/tracking.py --mode train --repeats 5      # the full loop, a few minutes on CPU
    python benchmarks/tracking.py --uri http://127.0.0.1:5000   # against a running tracking server
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trainer.config import from_dict  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.metrics import MlflowLogger, NullLogger  # noqa: E402
from trainer.session import Session  # noqa: E402

VOCAB, SEQ = 256, 64


def config(steps: int, tracking_uri: str):
    return from_dict(
        {
            "model": {"vocab_size": VOCAB, "d_model": 128, "n_layers": 2, "n_heads": 4, "max_seq_len": SEQ},
            "data": {"seq_len": SEQ, "prefetch": 0},
            "parallel": {"zero_stage": 0, "micro_batch_size": 8, "global_batch_size": 8},
            "optim": {"warmup_steps": 2},
            "train": {"steps": steps, "log_every": 1, "precision": "fp32", "torch_threads": 1},
            "cluster": {"num_workers": 1, "run_name": "tracking-benchmark"},
            "tracking": {"enabled": True, "uri": tracking_uri},
        }
    )


def random_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, VOCAB, (8, SEQ + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def step_time_s(cfg, logger) -> float:
    result = train(cfg, Session(), batches=random_batches(), logger=logger)
    return cfg.parallel.global_batch_size * cfg.data.seq_len / result.tokens_per_s


def interleaved_step_times(
    cfg, logger: MlflowLogger, blocks: int, block_steps: int
) -> dict[str, list[float]]:
    """A plain PyTorch training step, alternating blocks logged every step and unlogged. Returns
    per-step wall times per mode, and per-block CPU seconds of the whole process per step (the
    logger thread included: an "on" block ends by waiting for its metrics to be sent, outside the
    step times, so its writes count against it; CPU time barely moves with a busy machine's load)."""
    from trainer.model import Transformer, cross_entropy

    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = random_batches()
    times: dict[str, list[float]] = {"off": [], "on": [], "cpu_off": [], "cpu_on": []}
    step = 0
    for block in range(2 * blocks + 1):
        mode = "on" if block % 2 else "off"
        cpu0 = time.process_time()
        for _ in range(block_steps):
            t0 = time.perf_counter()
            x, y = next(batches)
            loss = cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if mode == "on":
                metrics = {"loss": loss.item(), "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0}
                logger.log({**metrics, "tokens_seen": float(step), "step_time_s": 0.05}, step)
            if block:  # block 0 warms up
                times[mode].append(time.perf_counter() - t0)
        if mode == "on":
            logger.flush()
        if block:
            times["cpu_" + mode].append((time.process_time() - cpu0) / block_steps)
    return times


def log_call_us(logger: MlflowLogger, n: int = 5_000) -> float:
    metrics = {k: 1.0 for k in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "step_time_s")}
    t0 = time.perf_counter()
    for step in range(10_000_000, 10_000_000 + n):
        logger.log(metrics, step)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default="", help="tracking URI (default: a SQLite store in a temp dir)")
    ap.add_argument("--mode", choices=("steps", "train"), default="steps", help="see the module doc")
    ap.add_argument("--steps", type=int, default=60, help="train mode: optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="train mode: runs per mode, alternated off/on")
    ap.add_argument("--blocks", type=int, default=20, help="steps mode: blocks per mode, alternated")
    ap.add_argument("--block-steps", type=int, default=10, help="steps mode: steps per block")
    args = ap.parse_args()

    from cluster.tracking import create_mlflow_run

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args.steps, args.uri or f"sqlite:///{tmp}/mlflow.db")
        run_id = create_mlflow_run(cfg, tmp)
        times: dict[str, list[float]] = {"off": [], "on": []}
        if args.mode == "steps":
            logger = MlflowLogger(cfg.tracking.uri, run_id)
            times = interleaved_step_times(cfg, logger, args.blocks, args.block_steps)
            logger.close()
        else:
            step_time_s(cfg, NullLogger())  # warm-up: imports, allocator, DeepSpeed init paths
            for _ in range(args.repeats):
                times["off"].append(step_time_s(cfg, NullLogger()))
                run_id = create_mlflow_run(cfg, tmp)  # a fresh run: steps start at 1
                times["on"].append(step_time_s(cfg, MlflowLogger(cfg.tracking.uri, run_id)))
        probe = MlflowLogger(cfg.tracking.uri, create_mlflow_run(cfg, tmp))
        per_call = log_call_us(probe)
        probe.close()

    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    cpu = {}
    if args.mode == "steps":
        cpu_off, cpu_on = statistics.median(times["cpu_off"]), statistics.median(times["cpu_on"])
        cpu = {
            "cpu_per_step_off_s": cpu_off,
            "cpu_per_step_on_s": cpu_on,
            "cpu_ratio_on_over_off": cpu_on / cpu_off,
        }
    report = {
        "mode": args.mode,
        **cpu,
        "step_time_off_s": off,
        "step_time_on_s": on,
        "ratio_on_over_off": on / off,
        "samples_per_mode": len(times["on"]),
        "log_call_us": per_call,
        "tracking_uri": "sqlite (temp)" if not args.uri else args.uri,
    }
    print(json.dumps(report, indent=1))
    print(
        f"step time with MLflow / without ({args.mode}): {on / off:.4f} (medians {on * 1e3:.2f} ms vs "
        f"{off * 1e3:.2f} ms); one log() call (6 metrics): {per_call:.1f} us"
    )
    if cpu:
        print(
            f"process CPU time per step, logger thread included, on/off: {cpu['cpu_ratio_on_over_off']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
