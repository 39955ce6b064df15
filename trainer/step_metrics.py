"""The loop's metrics: what one logged window of steps reports, and where it goes."""

from __future__ import annotations

import statistics
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
from trainer.progress import Progress
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
    """Wall time per phase of a step; syncs the device around each phase when enabled. Every phase
    entry is reported to the hang watchdog (`progress`). When enabled in a world of several ranks,
    the ranks also meet at a barrier before each phase: the time a rank waits there is time it was
    ahead of the slowest, which the straggler report subtracts from its step time."""

    def __init__(self, device: torch.device, progress: Progress | None = None, world: int = 1):
        self.device, self.enabled, self.totals = device, False, {}
        self.progress, self.world, self.waited = progress, world, 0.0

    @contextmanager
    def __call__(self, name: str):
        if self.progress is not None:
            self.progress.enter(name)
        if not self.enabled:
            yield
            return
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        if self.world > 1:
            dist.barrier()
            self.waited += time.perf_counter() - t0
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
        self,
        cfg: Config,
        sink: NullLogger,
        engine,
        topo,
        device: torch.device,
        steps: tuple[int, int],
        progress: Progress | None = None,
        events=None,
    ):
        self.cfg, self.sink, self.engine, self.device = cfg, sink, engine, device
        self.dp_group, self.dp_size = topo.dp_group, topo.dp
        self.start, self.stop = steps  # this attempt's first step (0-based) and the step it stops at
        self.progress, self.events = progress, events
        self.timer = PhaseTimer(self.device, progress, topo.world_size)
        self.stragglers = StragglerReport(cfg.train, topo.world_size, device, events)
        self.tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_tflops = cfg.train.peak_tflops or detect_peak_tflops(self.device.type)
        self.world = topo.world_size
        self.losses: dict[int, float] = {}  # logged step -> mean loss
        self.loss_sum = torch.zeros((), device=self.device)
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0
        self.data_metrics = None  # (first step, end step) -> the data's metrics of that window, or None
        self.step_began = self.window_start

    def due(self, step: int) -> bool:
        """Whether 0-based `step` is a logged one."""
        done = step + 1
        return done % self.cfg.train.log_every == 0 or done == self.stop or step == self.start

    def begin_step(self, step: int) -> None:
        self.timer.enabled = self.due(step)
        self.step_began = time.perf_counter()
        if self.progress is not None:
            self.progress.begin_step(step)

    def end_step(self, losses: list[torch.Tensor], data_wait_s: float) -> None:
        if self.timer.enabled:  # this rank's own time in a timed step: its wall time less its waits
            self.stragglers.add(time.perf_counter() - self.step_began - self.timer.waited)
            self.timer.waited = 0.0
        if self.progress is not None:
            self.progress.step_done()
        for loss in losses:
            self.loss_sum += loss
        self.window_steps += 1
        self.data_wait += data_wait_s

    def restart_window(self) -> None:
        """A rollback: the steps summed so far are trained again, so the window starts anew."""
        self.loss_sum.zero_()
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0

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
            **self.stragglers.window(step + 1),
        }
        if self.data_metrics is not None:
            metrics |= self.data_metrics(step + 1 - self.window_steps, step + 1)
        if self.peak_tflops:
            metrics["mfu"] = mfu(tps, self.flops_per_token, self.peak_tflops, self.world)
        self.losses[step + 1] = metrics["loss"]
        self.loss_sum.zero_()
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0
        return metrics


class StragglerReport:
    """Every log window: each rank's own step time (its timed steps' wall time less the time it
    waited for the others at the phase barriers), gathered in one small all_gather; the slowest
    rank's time over the median is `straggler_ratio`, its rank `straggler_rank`. A `straggler` event
    when the ratio stays above `train.straggler_ratio` for `train.straggler_windows` windows."""

    def __init__(self, train_cfg, world: int, device: torch.device, events=None):
        self.threshold, self.windows = train_cfg.straggler_ratio, train_cfg.straggler_windows
        self.world, self.device, self.events = world, device, events
        self.own_s, self.steps, self.over = 0.0, 0, 0

    def add(self, own_s: float) -> None:
        self.own_s, self.steps = self.own_s + own_s, self.steps + 1

    def window(self, step: int) -> dict[str, float]:
        """Collective on every rank (each log window): the window's straggler metrics, {} alone."""
        if self.world == 1 or not self.steps:
            return {}
        mine = torch.tensor([self.own_s / self.steps], dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        times = [float(t.item()) for t in gathered]
        self.own_s, self.steps = 0.0, 0
        median = statistics.median(times)
        slowest = max(range(self.world), key=times.__getitem__)
        ratio = times[slowest] / median if median > 0 else 1.0
        self.over = self.over + 1 if ratio > self.threshold else 0
        if self.over == self.windows and self.events is not None:
            self.events.write(
                "straggler",
                step=step,
                rank=slowest,
                ratio=round(ratio, 3),
                step_s={str(r): round(t, 4) for r, t in enumerate(times)},
                windows=self.windows,
            )
        return {"straggler_ratio": ratio, "straggler_rank": float(slowest)}
