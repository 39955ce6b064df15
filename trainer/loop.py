"""The training loop of one rank. Runs under Ray Train (via cluster/), torchrun, or alone."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from trainer import lazy_dynamo, reshard
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.config import Config, resolve_model_config
from trainer.data.manifest import Manifest
from trainer.data.stream import TokenStream, open_manifest, prefetched
from trainer.engine import initialize, lr_at, precision, set_lr
from trainer.evaluate import Evaluator
from trainer.events import EventLog, StartupClock
from trainer.fsutil import write_json_atomic
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
from trainer.model import cross_entropy, flops_per_token, param_count
from trainer.parallel.pipeline import build_pipeline_engine, pipeline_step
from trainer.parallel.plan import check_device_switches, sdpa_context
from trainer.parallel.tensor import vocab_parallel_cross_entropy
from trainer.parallel.topology import Topology
from trainer.parallel.zero_init import build_model
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
    val_losses: dict[int, float] = field(default_factory=dict)  # evaluated step -> validation loss

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "final_loss": self.final_loss,
            "tokens_per_s": self.tokens_per_s,
        }


def make_logger(cfg: Config, session: Session, logging_rank: int = 0) -> NullLogger:
    if session.rank != logging_rank:
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


class Preemption:
    """SIGTERM (a preempted node, `kill`, a scheduler's stop) asks for a checkpoint and a clean stop.

    The handler only sets a flag; ranks agree on it with a MAX all-reduce at logged steps, so every
    rank saves the same step. A signal handler can only be installed from the main thread: where
    the loop runs elsewhere (a Ray Train worker thread) the launcher's own handling applies.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class StepAlignedGC:
    """Python's garbage collection at the same step on every rank, every `every` steps.

    Python's automatic collector runs when allocations cross a threshold: at its own moment on
    each rank, mid-step, and every other rank waits for it at the next collective (a world of R
    ranks can lose R times one rank's pauses). On rank 0 of the quick start, MLflow's import after
    the first step alone sets off three full collections of ~300 ms each (benchmarks/gc_pauses.py).
    Megatron-LM (`--manual-gc`) and torchtitan (`gc_freq`) schedule it for the same reason. Here,
    once the first step is done, the automatic collector is off and what exists is frozen (the
    model, the engine, the modules: long-lived, not garbage); at each `every`-th step every rank
    makes a full collection, of what is newer only, and the first one freezes its survivors too.
    Objects are still freed by reference counting at once; only reference cycles wait for the
    step. `every` = 0 leaves Python's collector alone; `restore()` gives it back."""

    def __init__(self, every: int):
        self.every = every
        self._was_enabled = gc.isenabled()
        self._first = True
        if every:
            gc.disable()
            gc.freeze()

    def __call__(self, step: int) -> float | None:
        """After `step` (1-based) finished: the seconds a scheduled collection took, or None."""
        if not self.every or step % self.every:
            return None
        t0 = time.perf_counter()
        gc.collect()
        if self._first:  # survivors of the first are long-lived too (rank 0: MLflow's modules)
            gc.freeze()
            self._first = False
        return time.perf_counter() - t0

    def restore(self) -> None:
        if self.every:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()


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
    """Train to `cfg.train.steps` (or `train.stop_at`), resuming from the run's newest committed
    checkpoint when there is one. `batches` (micro batches for this rank) replaces the corpus
    stream, which tests use for synthetic data."""
    cleanup: list = []  # run whatever happens: flush metrics, stop samplers, restore handlers
    try:
        return _train(cfg, session or session_from_env(), batches, manifest, logger, cleanup)
    finally:
        for fn in reversed(cleanup):
            fn()


def start_node_metrics(cfg: Config, session: Session, cleanup: list) -> None:
    """System metrics of this node into the run, from its local rank 0, when tracking is on."""
    if (
        cfg.tracking.enabled
        and session.mlflow_run_id
        and session.local_rank == 0
        and cfg.tracking.system_metrics_every_s
    ):
        node = f"node{session.rank // session.local_world_size}"
        sampler = start_system_metrics(
            cfg.tracking.uri, session.mlflow_run_id, node, cfg.tracking.system_metrics_every_s
        )
        cleanup.append(lambda: stop_system_metrics(sampler))


def _train(cfg, session, batches, manifest, logger, cleanup) -> TrainResult:
    startup = StartupClock(session.extra.get("worker_started_at"))
    startup.mark("imports")  # since the launcher's worker entry, when it tells us
    if not cfg.train.compile:
        lazy_dynamo.defer()  # nothing here compiles: don't import dynamo to mark what mustn't
    device = session.device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(
        cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // session.local_world_size)
    )
    session.ensure_process_group("nccl" if device.type == "cuda" else "gloo")
    topo = Topology(session.world_size, session.rank, cfg.parallel.tp, cfg.parallel.pp).init_groups()
    dp_rank, dp_size = topo.dp_rank, topo.dp  # TP peers share a DP rank: identical batches
    startup.mark("process_group")

    if batches is None:
        manifest = manifest or open_manifest(cfg.data.path)
    cfg = resolve_model_config(cfg, manifest)
    check_device_switches(cfg, device)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg, topo, device, session.local_rank)  # ZeRO-3: partitioned as it is built
    startup.mark("model")  # under ZeRO-3 (zero.Init) with DeepSpeed's import and comm init
    # With TP the head returns this rank's vocab slice of the logits: the loss is vocab-parallel.
    loss_fn = cross_entropy if topo.tp == 1 else partial(vocab_parallel_cross_entropy, group=topo.tp_group)
    if topo.pp > 1:  # a PipelineEngine of this rank's stage; the last stage computes loss_fn
        engine, optimizer = build_pipeline_engine(cfg, model, topo, device, session.local_rank, loss_fn)
    else:
        engine, optimizer = initialize(
            cfg, model, session.world_size, device, session.local_rank, mpu=topo.mpu if topo.tp > 1 else None
        )
    startup.mark("deepspeed_initialize")

    ckpt = (
        CheckpointManager(session.run_dir, cfg.checkpoint, session.rank, session.world_size)
        if session.run_dir
        else None
    )
    stream = None
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
            workers=cfg.data.loader_workers,
        )
    layout = {
        "world": session.world_size,
        "dp": dp_size,
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        "zero_stage": cfg.parallel.zero_stage,
    }
    start = resume(ckpt, engine, cfg, manifest, stream, layout, topo.tp_rank) if ckpt else 0
    evaluator = None
    if cfg.train.eval_batches and manifest is not None:
        evaluator = Evaluator(
            cfg, manifest, dp_rank, dp_size, cfg.grad_accum(session.world_size), topo.dp_group
        )
    if stream is not None:
        batches = prefetched(stream.batches(start), cfg.data.prefetch)
    startup.mark("data_and_resume")
    meta = {
        "config_fingerprint": cfg.fingerprint(RESUME_INVARIANT),
        "manifest_fingerprint": manifest.fingerprint if manifest else "",
        "mlflow_run_id": session.mlflow_run_id,
        "layout": layout,
    }

    logger = logger or make_logger(cfg, session, topo.logging_rank)  # under PP: the last stage's
    cleanup.append(logger.close)
    accum = cfg.grad_accum(session.world_size)
    tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = cfg.train.peak_tflops or detect_peak_tflops(device.type)
    stop = min(cfg.train.stop_at or cfg.train.steps, cfg.train.steps)
    if session.rank == 0:
        log.info(
            "model: %s parameters, %s, dp=%d, accum=%d, steps %d..%d",
            f"{param_count(cfg.model):,}",
            precision(cfg, device),
            dp_size,
            accum,
            start,
            stop,
        )

    losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    loss_sum = torch.zeros((), device=device)
    timer = PhaseTimer(device)
    window_start, window_steps, data_wait, t_start = time.perf_counter(), 0, 0.0, None
    collect_garbage: StepAlignedGC | None = None
    preemption = Preemption()
    cleanup.append(preemption.restore)
    events = EventLog(session.run_dir, enabled=session.rank == 0)
    attempt = events.attempts() + 1
    events.write("start", attempt=attempt, resumed_from=start, world_size=session.world_size)
    cleanup.append(lambda: events.write("stop", step=int(engine.global_steps)))
    if attempt > 1 or start:  # resilience, visible in MLflow next to the loss
        logger.log({"restarts": float(attempt - 1), "resumed_from_step": float(start)}, start)
    startup.mark("tracking")  # the metrics logger, the event log
    for step in range(start, stop):
        # The first step of every attempt is logged too: start-up is visible, not hidden in a window.
        log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == stop or step == start
        timer.enabled = log_now  # phase timing syncs the device, so only on logged steps
        set_lr(optimizer, lr_at(step, cfg.optim, cfg.train.steps))
        if topo.pp > 1:  # train_batch: forward, backward (1F1B) and the step of all micro batches
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            data_wait += time.perf_counter() - t0
            with timer("pipeline"), sdpa_context(cfg):
                loss_sum += pipeline_step(engine, micro, accum)
        else:
            for _ in range(accum):
                t0 = time.perf_counter()
                x, y = next(batches)
                data_wait += time.perf_counter() - t0
                with timer("forward"), sdpa_context(cfg):
                    loss = loss_fn(engine(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
                with timer("backward"):
                    engine.backward(loss)
                with timer("optimizer"):
                    engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
                loss_sum += loss.detach().float() / accum
        window_steps += 1
        if t_start is None:
            t_start = time.perf_counter()  # steady state starts after the first step (warm-up, allocs)
            startup.mark("first_step")  # start-up ends with the first finished step
            events.write("startup", first_batch_wait_s=round(data_wait, 3), **startup.fields())
            # Only now: MLflow's monitor (its import and first contact with the store, 3 CPU-s)
            # would otherwise compete with the first step for the cores (2 s of it on 2 CPUs).
            start_node_metrics(cfg, session, cleanup)
            collect_garbage = StepAlignedGC(cfg.train.gc_every)  # from here on, the same step on every rank
            cleanup.append(collect_garbage.restore)
        gc_s = collect_garbage(step + 1) if collect_garbage is not None else None
        metrics: dict[str, float] = {} if gc_s is None else {"gc_s": gc_s}
        # Collectives, so only on logged steps: SIGTERM on any rank, or the launcher's preemption notice.
        preempted = log_now and (preemption.agreed(device) or session.preemption_requested())
        if log_now:
            dist.all_reduce(loss_sum, group=topo.dp_group)  # sum over DP ranks (TP peers hold the same)
            now = time.perf_counter()
            dt = (now - window_start) / window_steps
            tps = tokens_per_step / dt
            metrics.update(
                {
                    "loss": loss_sum.item() / (dp_size * window_steps),
                    "lr": lr_at(step, cfg.optim, cfg.train.steps),
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "tokens_per_s": tps,
                    "tokens_seen": float((step + 1) * tokens_per_step),
                    "step_time_s": dt,
                    "data_wait_frac": data_wait / (now - window_start),
                    "memory_gb": memory_gb(device),
                    "skipped_steps": float(engine.skipped_steps),
                    **{f"{k}_s": v for k, v in timer.pop().items()},
                }
            )
            if peak:
                metrics["mfu"] = mfu(tps, fpt, peak, session.world_size)
            losses[step + 1] = metrics["loss"]
            loss_sum.zero_()
            window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        if evaluator and (
            (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0) or step + 1 == stop
        ):
            t_eval = time.perf_counter()
            metrics.update(evaluator(engine, loss_fn, device, pipeline=topo.pp > 1))
            val_losses[step + 1] = metrics["val_loss"]
            window_start += time.perf_counter() - t_eval  # evaluation is not training throughput
        if ckpt and (
            (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0)
            or (step + 1 == stop and cfg.checkpoint.save_final)
            or preempted
        ):
            # Everything logged up to this step reaches MLflow before the checkpoint exists, so a
            # crash after the commit never leaves steps that a resume would not log again.
            logger.log(metrics, step + 1)
            logger.flush(timeout_s=10.0)
            data_state = stream.state_dict(step + 1) if stream else None
            save_s = ckpt.save(
                engine, step + 1, {**meta, "tokens_seen": (step + 1) * tokens_per_step, "data": data_state}
            )
            metrics = {"checkpoint_save_s": save_s}
            events.write("checkpoint", step=step + 1, save_s=save_s)
        if metrics:
            logger.log(metrics, step + 1)
        if preempted:
            log.warning("SIGTERM received: checkpoint committed at step %d, stopping", step + 1)
            events.write("preempted", step=step + 1)
            stop = step + 1
            break

    elapsed = time.perf_counter() - (t_start or time.perf_counter())
    steady_steps = stop - start - 1
    result = TrainResult(
        steps=stop,
        tokens=stop * tokens_per_step,
        final_loss=losses.get(stop, float("nan")),
        tokens_per_s=steady_steps * tokens_per_step / elapsed if steady_steps > 0 and elapsed > 0 else 0.0,
        losses=losses,
        val_losses=val_losses,
    )
    if session.rank == 0 and session.run_dir:
        write_json_atomic(
            os.path.join(session.run_dir, "summary.json"),
            {
                **result.summary(),
                "resumed_from": start,
                "losses": {str(k): v for k, v in losses.items()},
                "val_losses": {str(k): v for k, v in val_losses.items()},
            },
        )
    return result


# Config sections whose change would make a resumed run a different run.
RESUME_INVARIANT = ("model",)


def resume(
    ckpt: CheckpointManager,
    engine,
    cfg: Config,
    manifest: Manifest | None,
    stream=None,
    layout: dict | None = None,
    tp_rank: int = 0,
) -> int:
    """Load the newest committed checkpoint that checks out; the step to continue from (0 = none)."""
    found = ckpt.latest()
    if found is None:
        return 0
    rec = found.record
    if rec.get("config_fingerprint") != cfg.fingerprint(RESUME_INVARIANT):
        raise CheckpointError(
            f"{found.path}: the model section of the config differs from the one this "
            "checkpoint was trained with; resume with the run's own config.yaml"
        )
    force = cfg.checkpoint.ignore_data_mismatch
    if (
        not force
        and manifest is not None
        and rec.get("manifest_fingerprint") not in ("", manifest.fingerprint)
    ):
        raise CheckpointError(
            f"{found.path}: the corpus at {cfg.data.path} (manifest {manifest.fingerprint}) is "
            f"not the one this run was trained on ({rec.get('manifest_fingerprint')}); set "
            "checkpoint.ignore_data_mismatch: true to resume on it anyway"
        )
    if stream is not None and rec.get("data"):
        try:
            stream.check_resume(rec["data"], force=force)  # same corpus, seed, streams, global batch
        except ValueError as e:
            raise CheckpointError(f"{found.path}: {e}") from None
    theirs = rec.get("layout") or {}
    if layout is None or reshard.layout_key(theirs) == reshard.layout_key(layout):
        ckpt.load(engine, found)
    else:
        _load_other_layout(ckpt, engine, cfg, found, theirs, layout, tp_rank)
    if ckpt.rank == 0:
        log.info("resumed from committed checkpoint step %d (%s)", found.step, found.path)
    return found.step


def _load_other_layout(ckpt, engine, cfg: Config, found, theirs: dict, mine: dict, tp_rank: int) -> None:
    """Collective: convert the checkpoint to its layout-free form, then every rank loads its share.
    Rank 0 converts; with object storage every node holds its own verified copy of the step, so
    the first rank of each node converts it there. A failed conversion fails every rank alike."""
    if ckpt.rank == 0:
        log.info(
            "checkpoint step %d was written by %s; converting it for %s",
            found.step,
            reshard.describe(theirs),
            reshard.describe(mine),
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    converter = ckpt.rank == 0
    if ckpt.remote is not None and world > 1:
        hosts = [None] * world
        dist.all_gather_object(hosts, socket.gethostname())
        converter = hosts.index(hosts[ckpt.rank]) == ckpt.rank
    error = ""
    if converter:
        try:
            reshard.convert(found, cfg.model)
        except CheckpointError as e:
            error = str(e)
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    if any(errors):
        raise CheckpointError(next(e for e in errors if e))
    adam_step = reshard.load(
        engine, found.path / reshard.DIR, cfg.model, cfg.parallel.tp, tp_rank, cfg.parallel.pp
    )
    engine.global_steps = found.step
    engine.global_samples = found.step * cfg.parallel.global_batch_size
    if ckpt.rank == 0:
        log.info("resumed on a new layout: Adam step %d, weights and moments from %s", adam_step, found.path)
