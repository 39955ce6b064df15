"""The loop's metrics: what one logged window of steps reports, and where it goes."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from trainer.config import Config
from trainer.engine import lr_at
from trainer.metrics import (
    ConsoleLogger,
    MlflowLogger,
    MultiLogger,
    NullLogger,
    detect_peak_tflops,
    mfu,
    start_system_metrics,
    stop_system_metrics,
)
from trainer.model import flops_per_token
from trainer.session import Session


def make_logger(cfg: Config, session: Session, logging_rank: int = 0) -> NullLogger:
    """The console and MLflow on the logging rank; nothing anywhere else."""
    if session.rank != logging_rank:
        return NullLogger()
    loggers: list[NullLogger] = [ConsoleLogger(steps=cfg.train.steps)]  # with progress
    if cfg.tracking.enabled and session.mlflow_run_id:
        loggers.append(MlflowLogger(cfg.tracking.uri, session.mlflow_run_id))
    return MultiLogger(*loggers)


def start_node_metrics(cfg: Config, session: Session):
    """System metrics of this node into the run, from its local rank 0 when tracking is on; a
    function that stops them (or None)."""
    if not (
        cfg.tracking.enabled
        and session.mlflow_run_id
        and session.local_rank == 0
        and cfg.tracking.system_metrics_every_s
    ):
        return None
    node = f"node{session.rank // session.local_world_size}"
    sampler = start_system_metrics(
        cfg.tracking.uri, session.mlflow_run_id, node, cfg.tracking.system_metrics_every_s
    )
    return lambda: stop_system_metrics(sampler)


def memory_gb(device: torch.device) -> float:
    """Peak device memory on GPU; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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


class StepLogger:
    """Sums each step's loss on the device (no host sync) and, at logged steps, reports the window
    since the last one: mean loss over steps and DP ranks, throughput, phase times, memory.

    Logged steps: every `train.log_every`, the last step, and the first step of every attempt (so
    start-up is visible, not hidden in a window). Phase timing syncs the device, so it runs on
    logged steps only."""

    def __init__(
        self, cfg: Config, sink: NullLogger, engine, topo, device: torch.device, steps: tuple[int, int]
    ):
        self.cfg, self.sink, self.engine, self.device = cfg, sink, engine, device
        self.dp_group, self.dp_size = topo.dp_group, topo.dp
        self.start, self.stop = steps  # this attempt's first step (0-based) and the step it stops at
        self.timer = PhaseTimer(self.device)
        self.tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_tflops = cfg.train.peak_tflops or detect_peak_tflops(self.device.type)
        self.world = topo.world_size
        self.losses: dict[int, float] = {}  # logged step -> mean loss
        self.loss_sum = torch.zeros((), device=self.device)
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0

    def due(self, step: int) -> bool:
        """Whether 0-based `step` is a logged one."""
        done = step + 1
        return done % self.cfg.train.log_every == 0 or done == self.stop or step == self.start

    def begin_step(self, step: int) -> None:
        self.timer.enabled = self.due(step)

    def end_step(self, losses: list[torch.Tensor], data_wait_s: float) -> None:
        for loss in losses:
            self.loss_sum += loss
        self.window_steps += 1
        self.data_wait += data_wait_s

    def pause(self, seconds: float) -> None:
        """Time that is not training throughput (evaluation) leaves the window."""
        self.window_start += seconds

    def maybe_log(self, step: int) -> dict[str, float]:
        """Collective at logged steps (the same on every rank): the window's metrics, else {}."""
        if not self.due(step):
            return {}
        dist.all_reduce(self.loss_sum, group=self.dp_group)  # sum over DP ranks (TP peers hold the same)
        now = time.perf_counter()
        dt = (now - self.window_start) / self.window_steps
        tps = self.tokens_per_step / dt
        engine = self.engine
        metrics = {
            "loss": self.loss_sum.item() / (self.dp_size * self.window_steps),
            "lr": lr_at(step, self.cfg.optim, self.cfg.train.steps),
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": tps,
            "tokens_seen": float((step + 1) * self.tokens_per_step),
            "step_time_s": dt,
            "data_wait_frac": self.data_wait / (now - self.window_start),
            "memory_gb": memory_gb(self.device),
            "skipped_steps": float(engine.skipped_steps),
            **{f"{k}_s": v for k, v in self.timer.pop().items()},
        }
        if self.peak_tflops:
            metrics["mfu"] = mfu(tps, self.flops_per_token, self.peak_tflops, self.world)
        self.losses[step + 1] = metrics["loss"]
        self.loss_sum.zero_()
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0
        return metrics
