"""The training loop of one rank. Runs under Ray Train (via cluster/), torchrun, or alone."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from trainer.config import Config
from trainer.data.manifest import Manifest
from trainer.data.stream import TokenStream, open_manifest, prefetched
from trainer.engine import initialize, lr_at, precision, set_lr
from trainer.fsutil import write_json_atomic
from trainer.metrics import ConsoleLogger, MlflowLogger, MultiLogger, NullLogger, detect_peak_tflops, mfu
from trainer.model import Transformer, cross_entropy, flops_per_token, param_count
from trainer.parallel.plan import apply_plan, check_device_switches, sdpa_context
from trainer.session import Session, session_from_env

log = logging.getLogger("pretrain")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_loss: float
    tokens_per_s: float
    losses: dict[int, float] = field(default_factory=dict)  # logged step -> loss (mean over DP)

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "final_loss": self.final_loss,
            "tokens_per_s": self.tokens_per_s,
        }


def resolve_model_config(cfg: Config, manifest: Manifest | None) -> Config:
    """Fill model.vocab_size from the corpus when the config leaves it 0."""
    if cfg.model.vocab_size == 0:
        if manifest is None:
            raise ValueError("model.vocab_size is 0 and there is no corpus manifest to take it from")
        return replace(cfg, model=replace(cfg.model, vocab_size=manifest.vocab_size))
    if manifest is not None and cfg.model.vocab_size < manifest.vocab_size:
        raise ValueError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
            f"({manifest.vocab_size}) in {cfg.data.path}; set model.vocab_size: 0 to take it from the corpus"
        )
    return cfg


def make_logger(cfg: Config, session: Session) -> NullLogger:
    if session.rank != 0:
        return NullLogger()
    loggers: list[NullLogger] = [ConsoleLogger()]
    if cfg.tracking.enabled and session.mlflow_run_id:
        loggers.append(MlflowLogger(cfg.tracking.uri, session.mlflow_run_id))
    return MultiLogger(*loggers)


class PhaseTimer:
    """Wall time per phase of a step; syncs the device around each phase when enabled."""

    def __init__(self, device: torch.device):
        self.device, self.enabled, self.totals = device, False, {}

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def memory_gb(device: torch.device) -> float:
    """Peak device memory on GPU; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train(
    cfg: Config,
    session: Session | None = None,
    *,
    batches: Iterator[Batch] | None = None,
    manifest: Manifest | None = None,
    logger: NullLogger | None = None,
) -> TrainResult:
    """Train `cfg.train.steps` optimizer steps. `batches` (micro batches for this rank) replaces
    the corpus stream, which tests use for synthetic data."""
    session = session or session_from_env()
    device = session.device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // session.local_world_size)
    torch.set_num_threads(threads)
    session.ensure_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        raise NotImplementedError("parallel.tp/pp > 1 are not available in this version; set tp: 1, pp: 1")
    dp_rank, dp_size = session.rank, session.world_size

    if batches is None:
        manifest = manifest or open_manifest(cfg.data.path)
    cfg = resolve_model_config(cfg, manifest)
    check_device_switches(cfg, device)
    torch.manual_seed(cfg.train.seed)  # same init on every rank, before ZeRO partitions it
    model = apply_plan(Transformer(cfg.model), cfg)
    engine, optimizer = initialize(cfg, model, session.world_size, device, session.local_rank)
    if batches is None:
        stream = TokenStream(
            cfg.data.path,
            manifest,
            seq_len=cfg.data.seq_len,
            micro_batch=cfg.parallel.micro_batch_size,
            global_batch=cfg.parallel.global_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=cfg.train.seed,
            num_streams=cfg.data.num_streams,
        )
        batches = prefetched(stream.batches(0), cfg.data.prefetch)

    logger = logger or make_logger(cfg, session)
    accum = cfg.grad_accum(session.world_size)
    tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = cfg.train.peak_tflops or detect_peak_tflops(device.type)
    if session.rank == 0:
        log.info(
            "model: %s parameters, %s, dp=%d, accum=%d",
            f"{param_count(cfg.model):,}",
            precision(cfg, device),
            dp_size,
            accum,
        )

    losses: dict[int, float] = {}
    loss_sum = torch.zeros((), device=device)
    timer = PhaseTimer(device)
    window_start, window_steps, data_wait, t_start = time.perf_counter(), 0, 0.0, None
    for step in range(cfg.train.steps):
        log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
        timer.enabled = log_now  # phase timing syncs the device, so only on logged steps
        set_lr(optimizer, lr_at(step, cfg.optim, cfg.train.steps))
        for _ in range(accum):
            t0 = time.perf_counter()
            x, y = next(batches)
            data_wait += time.perf_counter() - t0
            with timer("forward"), sdpa_context(cfg):
                loss = cross_entropy(engine(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            with timer("backward"):
                engine.backward(loss)
            with timer("optimizer"):
                engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += loss.detach().float() / accum
        window_steps += 1
        if t_start is None:
            t_start = time.perf_counter()  # steady state starts after the first step (warm-up, allocs)
        if log_now:
            dist.all_reduce(loss_sum)  # sum over DP ranks of the per-rank mean losses
            now = time.perf_counter()
            dt = (now - window_start) / window_steps
            tps = tokens_per_step / dt
            metrics = {
                "loss": loss_sum.item() / (dp_size * window_steps),
                "lr": lr_at(step, cfg.optim, cfg.train.steps),
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "tokens_per_s": tps,
                "tokens_seen": float((step + 1) * tokens_per_step),
                "step_time_s": dt,
                "data_wait_frac": data_wait / (now - window_start),
                "memory_gb": memory_gb(device),
                **{f"{k}_s": v for k, v in timer.pop().items()},
            }
            if peak:
                metrics["mfu"] = mfu(tps, fpt, peak, session.world_size)
            losses[step + 1] = metrics["loss"]
            logger.log(metrics, step + 1)
            loss_sum.zero_()
            window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0

    elapsed = time.perf_counter() - (t_start or time.perf_counter())
    steady_steps = cfg.train.steps - 1
    result = TrainResult(
        steps=cfg.train.steps,
        tokens=cfg.train.steps * tokens_per_step,
        final_loss=losses[cfg.train.steps],
        tokens_per_s=steady_steps * tokens_per_step / elapsed if steady_steps and elapsed > 0 else 0.0,
        losses=losses,
    )
    logger.close()
    if session.rank == 0 and session.run_dir:
        write_json_atomic(
            os.path.join(session.run_dir, "summary.json"),
            {**result.summary(), "losses": {str(k): v for k, v in losses.items()}},
        )
    return result
