"""The training loop of one rank. Runs under Ray Train (via cluster/), torchrun, or alone.

`build()` assembles the parts once; `train()` only calls them, and each part decides its own
timing: the step logger (`maybe_log`), the evaluator (`maybe_run`), the checkpointer
(`maybe_save`), the step-aligned GC (`maybe_collect`) and the one stop decision (`preemption`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial

import torch

from trainer import library_internals
from trainer.anomaly import AnomalyGuard, load_skips
from trainer.checkpoint import RESUME_INVARIANT, Checkpointer, CheckpointManager
from trainer.config import Config, resolve_model_config
from trainer.data.manifest import Manifest
from trainer.data.mixing import corpus_stream
from trainer.data.stream import SkipList, open_manifest, prefetched
from trainer.engine import initialize, lr_at, precision, set_lr
from trainer.evaluate import Evaluator
from trainer.events import EventLog, StartupClock
from trainer.fsutil import write_json_atomic
from trainer.gc_schedule import StepAlignedGC
from trainer.metrics import NullLogger
from trainer.model import cross_entropy, param_count
from trainer.oom import reports_out_of_memory
from trainer.parallel.pipeline import build_pipeline_engine, pipeline_step
from trainer.parallel.plan import check_device_switches, sdpa_context
from trainer.parallel.tensor import vocab_parallel_cross_entropy
from trainer.parallel.topology import Topology
from trainer.parallel.zero_init import build_model
from trainer.preemption import Preemption
from trainer.progress import Progress
from trainer.session import Session, session_from_env
from trainer.step_metrics import StepLogger, make_logger, start_node_metrics
from trainer.timeouts import CollectiveTimeouts

log = logging.getLogger("pretrain")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_loss: float
    tokens_per_s: float
    losses: dict[int, float] = field(default_factory=dict)  # logged step -> loss (mean over DP)
    val_losses: dict[int, float] = field(default_factory=dict)  # evaluated step -> validation loss

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "final_loss": self.final_loss,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass
class Trainer:
    """One rank's training, assembled by `build()`."""

    cfg: Config
    session: Session
    device: torch.device
    topo: Topology
    engine: object  # DeepSpeed's engine (a PipelineEngine under PP)
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    batches: Iterator[Batch]  # this rank's micro batches, from the step it resumes at
    checkpointer: Checkpointer
    evaluator: Evaluator
    logger: StepLogger
    gc: StepAlignedGC
    preemption: Preemption
    events: EventLog
    startup: StartupClock
    progress: Progress  # what the hang watchdog sees of this rank
    start: int  # first step of this attempt (0-based: the number of steps already committed)
    stop: int  # this attempt ends after this many steps
    started_at: float | None = None  # wall clock at the end of the first step (steady state begins)
    anomaly: AnomalyGuard | None = None  # the agreed finite/spike check before each optimizer step
    restore: Callable[[], int | None] | None = None  # reload the newest commit (None: nothing committed)
    reposition: Callable[[int], Iterator[Batch]] | None = None  # the micro batches from a step (a stream)

    @property
    def accum(self) -> int:
        return self.cfg.grad_accum(self.session.world_size)

    def next_micro_batches(self) -> tuple[list[Batch], float]:
        """One step's micro batches for this rank and the seconds spent waiting for them."""
        t0 = time.perf_counter()
        micro = [next(self.batches) for _ in range(self.accum)]
        return micro, time.perf_counter() - t0


def train(
    cfg: Config,
    session: Session | None = None,
    *,
    batches: Iterator[Batch] | None = None,
    manifest: Manifest | None = None,
    logger: NullLogger | None = None,
) -> TrainResult:
    """Train to `cfg.train.steps` (or `train.stop_at`), resuming from the run's newest committed
    checkpoint when there is one. `batches` (micro batches for this rank) replaces the corpus
    stream, which tests use for synthetic data."""
    with ExitStack() as cleanup:  # whatever happens: flush metrics, stop samplers, restore handlers
        t = build(
            cfg, session or session_from_env(), cleanup, batches=batches, manifest=manifest, logger=logger
        )
        sink = t.logger.sink
        cleanup.enter_context(reports_out_of_memory(t.progress, t.device, cfg.parallel, t.session.rank))
        step = t.start
        while step < t.stop:
            t.logger.begin_step(step)
            micro, waited = t.next_micro_batches()
            losses = train_step(t, step, micro)
            verdict, anomaly_metrics = t.anomaly.settle(step)
            if verdict != "ok":  # left out: nothing changed, nothing to log, save or evaluate
                sink.log(anomaly_metrics, step + 1)
                step = roll_back(t, step) if verdict == "rollback" else step
                continue
            if after_step(t, step, losses, waited, cleanup):  # preempted: committed, stop here
                log.warning("SIGTERM received: checkpoint committed at step %d, stopping", step + 1)
                t.events.write("preempted", step=step + 1)
                t.stop = step + 1
                break
            step += 1
        if closed := t.checkpointer.close():  # a background save still in flight (checkpoint.async)
            sink.log(closed, t.stop)
        return finish(t)


def after_step(t: Trainer, step: int, losses: list[torch.Tensor], waited: float, cleanup: ExitStack) -> bool:
    """What follows an applied optimizer step (0-based `step`), each component at its own steps:
    metrics, GC, evaluation, checkpoint. Returns whether the run was preempted (then committed)."""
    done, last = step + 1, step + 1 == t.stop
    t.logger.end_step(losses, waited)
    if t.started_at is None:
        first_step_done(t, cleanup)
    metrics = t.gc.maybe_collect(done)
    preempted = t.preemption.should_stop(check_now=t.logger.due(step))
    metrics.update(t.logger.maybe_log(step))
    metrics.update(evaluate(t, done, last))
    if metrics:
        t.logger.sink.log(metrics, done)
    save(t, done, last, preempted)
    return preempted


def evaluate(t: Trainer, done: int, last: bool) -> dict[str, float]:
    """Validation metrics after `done` steps when due (collective), else {}; its time is not
    training throughput."""
    if not t.evaluator.due(done, last=last):
        return {}
    t.progress.enter("eval")
    t0 = time.perf_counter()
    metrics = t.evaluator.maybe_run(done, last=last)
    t.logger.pause(time.perf_counter() - t0)
    return metrics


def save(t: Trainer, done: int, last: bool, preempted: bool) -> None:
    """The checkpoint after `done` steps when due, and a background save's commit when every rank
    has written it (collective). After a synchronous commit mid-run, the launcher may resize the
    group there (`Session.committed`: no save in flight, nothing to retrain)."""
    if t.checkpointer.due(done, last=last, forced=preempted):
        t.progress.enter("checkpoint")
        write_summary(t, attempt_result(t, done))  # a crash from here keeps the history
    saved = t.checkpointer.maybe_save(done, last=last, forced=preempted)
    if saved:
        t.logger.sink.log(saved, done)
    if "checkpoint_save_s" in saved and "checkpoint_stall_s" not in saved and not (last or preempted):
        t.session.committed(done)


def train_step(t: Trainer, step: int, micro: list[Batch]) -> list[torch.Tensor]:
    """One optimizer step (0-based `step`) over this rank's micro batches. Returns the detached
    loss terms whose sum is the step's mean loss (device tensors: no host sync)."""
    set_lr(t.optimizer, lr_at(step, t.cfg.optim, t.cfg.train.steps) * t.anomaly.lr_factor(step))
    timer, device = t.logger.timer, t.device
    if t.topo.pp > 1:  # train_batch: forward, backward (1F1B) and the step of all micro batches
        with timer("pipeline"), sdpa_context(t.cfg):
            return [pipeline_step(t.engine, micro, len(micro))]
    losses = []
    for x, y in micro:
        with timer("forward"), sdpa_context(t.cfg):
            loss = t.loss_fn(t.engine(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        with timer("backward"):
            t.engine.backward(loss)
        losses.append(loss.detach().float() / len(micro))
        t.anomaly.losses = losses  # the finite check before the optimizer step reads them
        with timer("optimizer"):
            t.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
    return losses


def roll_back(t: Trainer, step: int) -> int:
    """Reload the newest commit and reopen the data there, without the skipped samples; the step to
    go on at (`step` itself when nothing is committed or the batches are not a corpus stream)."""
    restore = t.restore if t.reposition is not None else (lambda: None)
    target = t.anomaly.roll_back(step, restore)
    if target != step:
        getattr(t.batches, "close", lambda: None)()  # its reader threads
        t.batches = t.reposition(target)
        t.logger.restart_window()
    return target


def first_step_done(t: Trainer, cleanup: ExitStack) -> None:
    """Start-up ends with the first finished step; what would compete with it starts now."""
    t.started_at = time.perf_counter()  # steady state starts after the first step (warm-up, allocs)
    t.startup.mark("first_step")
    t.events.write("startup", first_batch_wait_s=round(t.logger.data_wait, 3), **t.startup.fields())
    if resized := t.session.extra.get("resized"):  # the launcher changed the group size: time it cost
        lost_s = round(time.time() - resized["since"], 3)  # from the commit resumed to this first step
        t.events.write("resize", **resized, step=t.start, lost_s=lost_s)
        t.logger.sink.log({"resize_lost_s": lost_s}, t.start)
    # MLflow's system-metrics monitor (its import and first contact with the store) would otherwise
    # compete with the first step for the cores.
    stop_node_metrics = start_node_metrics(t.cfg, t.session)
    if stop_node_metrics is not None:
        cleanup.callback(stop_node_metrics)
    t.gc.start()  # from here on, collections at the same step on every rank
    cleanup.callback(t.gc.restore)


def build(
    cfg: Config,
    session: Session,
    cleanup: ExitStack,
    *,
    batches: Iterator[Batch] | None = None,
    manifest: Manifest | None = None,
    logger: NullLogger | None = None,
) -> Trainer:
    """Assemble one rank's training: process group and layout, model and engine, data positioned
    at the newest committed checkpoint, evaluator, metrics, GC schedule, preemption handling."""
    startup = StartupClock(session.extra.get("worker_started_at"))
    # First, so that a rank stuck in start-up shows; it also sets the collective timeout by phase.
    timeouts = CollectiveTimeouts(cfg.cluster.collective_timeout_s, cfg.train.hang_startup_timeout_s)
    progress = Progress(session.run_dir, session.rank, on_phase=timeouts.phase)
    cleanup.callback(progress.close)
    startup.mark("imports")  # since the launcher's worker entry, when it tells us
    device, topo = _setup_process(cfg, session)
    startup.mark("process_group")
    if batches is None:
        manifest = manifest or open_manifest(cfg.data.path)
    cfg = resolve_model_config(cfg, manifest)
    engine, optimizer, loss_fn = _build_engine(cfg, session, topo, device, startup)
    stream = (
        None
        if batches is not None
        else corpus_stream(cfg, manifest, topo.dp_rank, topo.dp, cfg.data.loader_workers)
    )
    sink = logger or make_logger(cfg, session, topo.logging_rank)  # under PP: the last stage's
    cleanup.callback(sink.close)
    events = EventLog(session.run_dir, enabled=session.rank == 0)
    checkpointer, layout = _checkpointer(cfg, session, topo, engine, manifest, stream, sink, events)
    if stream is not None:
        load_skips(session.run_dir, stream.skip)  # skipped since the newest commit
    start = checkpointer.restore(cfg, manifest, stream, layout, topo.tp_rank)
    stop = min(cfg.train.stop_at or cfg.train.steps, cfg.train.steps)
    accum = cfg.grad_accum(session.world_size)
    evaluator = Evaluator(
        cfg, manifest, topo.dp_rank, topo.dp, accum, topo.dp_group, run=(engine, loss_fn, device, topo.pp > 1)
    )
    anomaly = _anomaly_guard(cfg, session, topo, engine, device, stream, events)
    if stream is not None:
        batches = prefetched(stream.batches(start), cfg.data.prefetch)
    startup.mark("data_and_resume")
    preemption = Preemption(session.preemption_requested)
    cleanup.callback(preemption.restore)
    t = Trainer(
        cfg=cfg,
        session=session,
        device=device,
        topo=topo,
        engine=engine,
        optimizer=optimizer,
        loss_fn=loss_fn,
        batches=batches,
        checkpointer=checkpointer,
        evaluator=evaluator,
        logger=StepLogger(cfg, sink, engine, topo, device, (start, stop), progress, events),
        gc=StepAlignedGC(cfg.train.gc_every),
        preemption=preemption,
        events=events,
        startup=startup,
        progress=progress,
        start=start,
        stop=stop,
        anomaly=anomaly,
    )
    if stream is not None and checkpointer.manager is not None:  # what a rollback calls
        t.restore = lambda: checkpointer.roll_back(cfg, manifest, stream, layout, topo.tp_rank)
        t.reposition = lambda step: prefetched(stream.batches(step), cfg.data.prefetch)
    t.logger.data_metrics = getattr(stream, "window_metrics", None)  # a mixture's tokens per source
    _announce(t, cleanup)
    t.logger.window_start = time.perf_counter()  # the first window starts with the first step
    startup.mark("tracking")  # the metrics logger, the event log
    return t


def _anomaly_guard(
    cfg: Config, session: Session, topo: Topology, engine, device, stream, events
) -> AnomalyGuard:
    """The finite/spike check before each optimizer step, skipping the corpus stream's samples."""
    skip = (
        stream.skip if stream is not None else SkipList(cfg.parallel.global_batch_size, cfg.data.skip_samples)
    )
    return AnomalyGuard(
        cfg.train,
        engine,
        device,
        skip,
        events=events,
        run_dir=session.run_dir,
        rank=session.rank,
        pipeline=topo.pp > 1,
    )


def _setup_process(cfg: Config, session: Session) -> tuple[torch.device, Topology]:
    """This process's device, threads, process group and parallel layout."""
    if not cfg.train.compile:
        library_internals.defer_dynamo()  # nothing here compiles: don't import dynamo to mark what mustn't
    device = session.device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(
        cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // session.local_world_size)
    )
    # Start-up's timeout; steady state gets cluster.collective_timeout_s after the first step (timeouts.py).
    timeout_s = max(cfg.train.hang_startup_timeout_s, cfg.cluster.collective_timeout_s)
    session.ensure_process_group("nccl" if device.type == "cuda" else "gloo", timeout_s)
    topo = Topology(session.world_size, session.rank, cfg.parallel.tp, cfg.parallel.pp).init_groups()
    return device, topo  # TP peers share a DP rank: identical batches


def _build_engine(cfg: Config, session: Session, topo: Topology, device: torch.device, startup: StartupClock):
    """The model, parallelized and wrapped by DeepSpeed; its optimizer; the loss for this layout."""
    check_device_switches(cfg, device)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg, topo, device, session.local_rank)  # ZeRO-3: partitioned as it is built
    startup.mark("model")  # under ZeRO-3 (zero.Init) with DeepSpeed's import and comm init
    # With TP the head returns this rank's vocab slice of the logits: the loss is vocab-parallel.
    loss_fn = cross_entropy if topo.tp == 1 else partial(vocab_parallel_cross_entropy, group=topo.tp_group)
    if topo.pp > 1:  # a PipelineEngine of this rank's stage; the last stage computes loss_fn
        engine, optimizer = build_pipeline_engine(cfg, model, topo, device, session.local_rank, loss_fn)
    else:
        mpu = topo.mpu if topo.tp > 1 else None
        engine, optimizer = initialize(cfg, model, session.world_size, device, session.local_rank, mpu=mpu)
    startup.mark("deepspeed_initialize")
    return engine, optimizer, loss_fn


def _checkpointer(cfg, session, topo, engine, manifest, stream, sink, events) -> tuple[Checkpointer, dict]:
    """The checkpoint component (no manager without a run directory) and this run's layout."""
    layout = {"world": session.world_size, "dp": topo.dp, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp}
    layout["zero_stage"] = cfg.parallel.zero_stage
    manager = None
    if session.run_dir:
        manager = CheckpointManager(session.run_dir, cfg.checkpoint, session.rank, session.world_size)
    checkpointer = Checkpointer(
        manager,
        cfg.checkpoint,
        engine,
        meta={
            "config_fingerprint": cfg.fingerprint(RESUME_INVARIANT),
            "manifest_fingerprint": manifest.fingerprint if manifest else "",
            "mlflow_run_id": session.mlflow_run_id,
            "layout": layout,
        },
        tokens_per_step=cfg.parallel.global_batch_size * cfg.data.seq_len,
        data_state=lambda step: stream.state_dict(step) if stream else None,
        before_save=lambda: sink.flush(timeout_s=10.0),  # what was logged reaches MLflow before the commit
        events=events,
    )
    return checkpointer, layout


def _announce(t: Trainer, cleanup: ExitStack) -> None:
    """This attempt's start: a console line, the `start` event, and restarts into the metrics."""
    if t.session.rank == 0:
        log.info(
            "model: %s parameters, %s, dp=%d, accum=%d, steps %d..%d",
            f"{param_count(t.cfg.model):,}",
            precision(t.cfg, t.device),
            t.topo.dp,
            t.accum,
            t.start,
            t.stop,
        )
    attempt = t.events.attempts() + 1
    t.events.write("start", attempt=attempt, resumed_from=t.start, world_size=t.session.world_size)
    cleanup.callback(lambda: t.events.write("stop", step=int(t.engine.global_steps)))
    if attempt > 1 or t.start:  # resilience, visible in MLflow next to the loss (workers: elastic resizes)
        metrics = {"restarts": float(attempt - 1), "resumed_from_step": float(t.start)}
        t.logger.sink.log({**metrics, "workers": float(t.session.world_size)}, t.start)


def finish(t: Trainer) -> TrainResult:
    """The attempt's result; rank 0 writes it to `<run_dir>/summary.json`."""
    result = attempt_result(t, t.stop)
    write_summary(t, result)
    return result


def attempt_result(t: Trainer, done: int) -> TrainResult:
    """This attempt's result after `done` finished steps."""
    tokens_per_step = t.logger.tokens_per_step
    elapsed = time.perf_counter() - (t.started_at or time.perf_counter())
    steady_steps = done - t.start - 1
    return TrainResult(
        steps=done,
        tokens=done * tokens_per_step,
        final_loss=t.logger.losses.get(done, float("nan")),
        tokens_per_s=steady_steps * tokens_per_step / elapsed if steady_steps > 0 and elapsed > 0 else 0.0,
        losses=dict(t.logger.losses),
        val_losses=dict(t.evaluator.val_losses),
    )


def write_summary(t: Trainer, result: TrainResult) -> None:
    """Rank 0: `<run_dir>/summary.json`, the run's whole logged history (every attempt's losses, a
    later attempt's value winning for a step logged twice) and one entry per attempt."""
    if t.session.rank != 0 or not t.session.run_dir:
        return
    path = os.path.join(t.session.run_dir, "summary.json")
    before = _read_summary(path)
    number = t.events.attempts()
    attempt = {"attempt": number, "resumed_from": t.start, **result.summary()}
    earlier = [a for a in before.get("attempts", []) if isinstance(a, dict) and a.get("attempt") != number]
    write_json_atomic(
        path,
        {
            **result.summary(),
            "resumed_from": t.start,
            "losses": {**before.get("losses", {}), **{str(k): v for k, v in result.losses.items()}},
            "val_losses": {
                **before.get("val_losses", {}),
                **{str(k): v for k, v in result.val_losses.items()},
            },
            "attempts": [*earlier, attempt],
        },
    )


def _read_summary(path: str) -> dict:
    """A run's summary.json so far; {} when there is none or it cannot be read."""
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}
