"""The driver: a validated config becomes a Ray Train run (worker group, placement, restarts,
storage), with its run directory and its MLflow run created once, here, before workers start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from cluster.commits import newest_commit
from cluster.commits import where as store_where
from cluster.errors import CapacityError, RunError, RunStopped, save_traceback
from cluster.lease import RunLease
from cluster.ray_session import MLFLOW_ERROR, STOPPED_BY
from cluster.tracking import (
    check_reachable,
    create_mlflow_run,
    delete_mlflow_run,
    end_mlflow_run,
    log_event_artifact,
    log_hang_artifacts,
    log_run_artifacts,
    ray_job_id,
    reopen_mlflow_run,
    run_link,
    tag_ray_job,
)
from trainer.config import Config, save_config
from trainer.data.storage import check_root, is_remote
from trainer.errors import PretrainError
from trainer.events import EventLog
from trainer.fsutil import write_json_atomic
from trainer.progress import group_stopped

log = logging.getLogger("pretrain")

# Ray Train's switch for its controller's poll of the worker group (propagated to the controller).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = 0.5


def absolutize(cfg: Config) -> Config:
    """Paths relative to the user's working directory, fixed before workers (other cwd) see them."""
    data_path = cfg.data.path if is_remote(cfg.data.path) else os.path.abspath(cfg.data.path)
    sources = [
        replace(s, path=s.path if is_remote(s.path) else os.path.abspath(s.path)) for s in cfg.data.sources
    ]
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return replace(
        cfg,
        data=replace(cfg.data, path=data_path, sources=sources),
        tracking=replace(cfg.tracking, uri=uri),
        cluster=replace(cfg.cluster, storage_path=os.path.abspath(cfg.cluster.storage_path)),
    )


def new_run_dir(cfg: Config) -> tuple[str, Path]:
    name = cfg.cluster.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.cluster.storage_path) / name
    if run_dir.exists():
        raise _run_exists(name, run_dir)
    return name, run_dir


def _run_exists(name: str, run_dir: Path) -> RunError:
    return RunError(
        f"run {name} already exists at {run_dir}; pick another cluster.run_name",
        field="cluster.run_name",
        path=str(run_dir),
    )


def create_run_dir(cfg: Config, run_dir: Path) -> RunLease:
    """Make the new run's directory (exclusively: of two drivers starting one name, one gets it)
    and take its lease in it, before anything else is written there."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise _run_exists(run_dir.name, run_dir) from None
    lease = RunLease(run_dir, cfg.cluster.lease_timeout_s, cfg.checkpoint.storage)
    try:
        lease.acquire()
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return lease


def write_run_record(run_dir: Path, record: dict) -> None:
    write_json_atomic(str(run_dir / "run.json"), record)


def read_run_record(run_dir: Path) -> dict:
    """run.json (written atomically); RunError naming it when it is not a JSON object."""
    path = run_dir / "run.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        record = e
    if not isinstance(record, dict):
        raise RunError(
            f"{path} is not a readable run record ({record}); restore it from a backup, or write "
            '{"name": "<run>", "mlflow_run_id": "<id or empty>"} into it',
            path=str(path),
        )
    return record


def ray_train_environment() -> None:
    """Ray Train's switches for this run, as environment variables it propagates to its controller
    and workers; a person's own setting of one stands."""
    # Ray Train's print patch echoes every worker line twice through the driver; plain stdout
    # forwarding (log_to_driver) already shows it once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # How often the controller polls the workers: a dead worker is seen, and a finished group
    # ended, within this (Ray's default 2 s). One poll is one small RPC per worker.
    os.environ.setdefault(HEALTH_CHECK_ENV, str(HEALTH_CHECK_INTERVAL_S))


def start_ray(cfg: Config):
    ray_train_environment()
    import ray

    if ray.is_initialized():
        return ray
    # Inside a Ray job (`pretrain submit`, `ray job submit`) Ray sets RAY_ADDRESS to the cluster's
    # GCS: join it. An http(s) RAY_ADDRESS is a job-API address meant for `ray job`, not for us.
    joined = os.environ.get("RAY_ADDRESS", "")
    address = cfg.cluster.address or ("" if joined.startswith(("http://", "https://")) else joined)
    if address:
        check_ray_address(address, "cluster.address" if cfg.cluster.address else "RAY_ADDRESS")
        ray.init(address=address, log_to_driver=True)
        return ray
    # An embedded cluster for this process only, reachable from this machine only. It ends with
    # this process, so it starts without what only a long-lived cluster uses (each one is Python
    # processes to start on a laptop's few cores): the dashboard (web UI, job and state APIs:
    # `pretrain submit` goes to a cluster's own), idle workers prestarted for the driver (Ray
    # Train's actors run in a runtime env of their own and never use them), and Ray Train's
    # node-drain watcher and Prometheus metrics (read here, passed on to its controller). Ray
    # Train's placement group cleaner goes too, and so do the autoscaler's monitor and Ray's API
    # server (cluster/library_internals.py). Its sockets stay on 127.0.0.1 (single-machine mode).
    global _embedded
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    from cluster import library_internals as internals

    with internals.single_machine_mode(), internals.lean_head():
        ray.init(
            address="local",  # a new cluster: never the latest `ray start` one on this machine
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
            _system_config=internals.EMBEDDED_SYSTEM_CONFIG,
        )
    _embedded = True
    return ray


def check_ray_address(address: str, field: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing listens at a host:port (or ray://host:port) cluster address:
    `ray.init` would retry for minutes. "auto" and forms Ray parses otherwise are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RunError(
            f"{field} {address}: no Ray cluster answers there ({e.strerror or e}); start one "
            "(`ray start --head`) or leave cluster.address empty to run on a local Ray",
            field=field,
        ) from None


_embedded = False  # whether this process's Ray is the embedded cluster start_ray started


def trainer_class(elastic_sizes=None, grow_key: str = ""):
    """Ray Train's trainer for this process's Ray (cluster/library_internals.py says what it drops)."""
    from cluster.library_internals import trainer_class as lean_trainer_class

    return lean_trainer_class(_embedded, elastic_sizes, grow_key)


class _StopOnSigterm:
    """SIGTERM to the driver (`pretrain stop`, a scheduler): while Ray Train runs the group, abort
    its controller as its own Ctrl-C handler does (a Python exception raised while the driver waits
    in `ray.get` is swallowed by Ray), then stop with RunStopped once `fit` returns; before that,
    raise RunStopped at once."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.received = run_dir, False

    def __call__(self, signum, frame):
        self.received = True
        abort = signal.getsignal(signal.SIGINT)  # Ray Train's, while fit() waits on its controller
        if not callable(abort) or abort is signal.default_int_handler:
            self.stop()
        abort(signal.SIGINT, frame)

    def stop(self):
        raise RunStopped(
            f"run {self.run_dir.name} stopped by SIGTERM; continue it with `pretrain resume {self.run_dir}`"
        )


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def check_corpus(cfg: Config) -> None:
    """Fail here, before any run directory or Ray process exists, if the corpus cannot serve cfg."""
    from trainer.config import resolve_model_config
    from trainer.data.mixing import MixedStream, corpus_stream
    from trainer.data.stream import open_manifest

    stream = corpus_stream(cfg, None, dp_rank=0, dp_size=cfg.dp()) if cfg.data.sources else None
    manifest = open_manifest(cfg.data.path)  # a mixture's val split and tokenizer: data.path's
    resolve_model_config(cfg, manifest)
    if not isinstance(stream, MixedStream):
        corpus_stream(cfg, manifest, dp_rank=0, dp_size=cfg.dp())


def run_training(cfg: Config) -> dict:
    """A new run of `cfg` on Ray, to completion; returns the final summary plus the run's location."""
    t0 = time.perf_counter()
    for root in (cfg.data.path, *(s.path for s in cfg.data.sources)):
        check_root(root)  # refuses pipe: and unknown schemes before paths are made absolute
    cfg = absolutize(cfg)
    check_corpus(cfg)
    name, run_dir = new_run_dir(cfg)
    if cfg.tracking.enabled:
        check_reachable(cfg.tracking.uri)
    cfg = replace(cfg, cluster=replace(cfg.cluster, run_name=name))
    lease = create_run_dir(cfg, run_dir)
    try:
        save_config(cfg, run_dir / "config.yaml")
    except Exception:
        lease.release()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    # Ray first, alone: imports beside its start slow its agents, and the raylet then registers
    # after the driver's first look, which Ray repeats only a second later. Then Ray Train's import,
    # then the MLflow run on a thread (MLflow's import and store set-up: seconds of CPU) while Ray
    # Train starts the worker group; the workers read its id from run.json (cluster/ray_session.py).
    pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow-run")
    mlflow_run = _known("")
    try:
        start_ray_logged(cfg, run_dir)
        _import_ray_train()
        mlflow_run = pool.submit(_create_mlflow_run, cfg, run_dir) if cfg.tracking.enabled else _known("")
        if mlflow_run.done():
            mlflow_run.result()  # its error now, before any worker starts
        write_run_record(run_dir, {"name": name, "state": "running", "tracking_uri": cfg.tracking.uri})
    except Exception:
        pool.shutdown(wait=False)
        lease.release()
        shutil.rmtree(run_dir, ignore_errors=True)  # never leave a half-made run behind
        if mlflow_run_id := _mlflow_run_id(mlflow_run, wait=True):  # never an orphan
            delete_mlflow_run(cfg, mlflow_run_id)
        raise
    # Queued behind the run's creation: its id (or its error) into run.json, for the workers.
    recorded = pool.submit(_record_mlflow_run, cfg, run_dir, mlflow_run)
    pool.shutdown(wait=False)
    try:
        with _released(lease):
            return _fit(cfg, run_dir, recorded, t0)
    except Exception as e:
        if recorded.done() and recorded.exception() is not None:  # no MLflow run, so no run either:
            shutil.rmtree(run_dir, ignore_errors=True)  # no rank trained (they wait for its id)
            e.run_dir = ""
        raise


def _known(value: str) -> Future:
    done = Future()
    done.set_result(value)
    return done


def _mlflow_run_id(mlflow_run: Future, wait: bool = False) -> str:
    """The run's MLflow run id; "" while it is being created (unless `wait`) or if that failed."""
    if not (wait or mlflow_run.done()):
        return ""
    try:
        return mlflow_run.result()
    except Exception:
        return ""


def _record_mlflow_run(cfg: Config, run_dir: Path, mlflow_run: Future) -> str:
    """Once the MLflow run exists: its id in run.json (the workers wait for it there), the Ray job
    it runs in, and its link; its error in run.json instead when it could not be created."""
    try:
        mlflow_run_id = mlflow_run.result()
    except Exception as e:
        write_run_record(run_dir, {**read_run_record(run_dir), MLFLOW_ERROR: str(e)})
        raise
    write_run_record(run_dir, {**read_run_record(run_dir), "mlflow_run_id": mlflow_run_id})
    EventLog(str(run_dir)).write("mlflow_run_created")  # while the worker group starts
    _announce_mlflow_run(cfg, run_dir, mlflow_run_id)
    return mlflow_run_id


def _announce_mlflow_run(cfg: Config, run_dir: Path, mlflow_run_id: str) -> None:
    _record_ray_job(cfg, run_dir, mlflow_run_id)
    if cfg.tracking.enabled and (link := run_link(cfg.tracking.uri, mlflow_run_id)):
        log.info("mlflow: %s", link)  # the run's charts, while it runs


@contextlib.contextmanager
def _released(lease: RunLease):
    """The run's lease, given back however the driver leaves (a return, an error, SIGTERM's RunStopped)."""
    try:
        yield lease
    finally:
        lease.release()


def _create_mlflow_run(cfg: Config, run_dir: Path) -> str:
    mlflow_run_id = create_mlflow_run(cfg, run_dir)
    log_run_artifacts(cfg, mlflow_run_id)
    return mlflow_run_id


def _import_ray_train() -> None:
    import ray.train  # noqa: F401
    import ray.train.v2.api.data_parallel_trainer  # noqa: F401


def start_ray_logged(cfg: Config, run_dir: Path):
    """`start_ray`, with Ray's start time as the run's `ray_started` event unless Ray was up."""
    import ray

    if ray.is_initialized():
        return ray
    t0 = time.perf_counter()
    start_ray(cfg)
    EventLog(str(run_dir)).write("ray_started", init_s=round(time.perf_counter() - t0, 3))
    return ray


# What `pretrain resume RUN --set ...` may change: how long and where it runs, and its layout (the
# checkpoint is converted when the layout changes; the global batch, and so the data order, stays).
RESUMABLE_OVERRIDES = (
    "cluster.num_workers",
    "cluster.min_workers",
    "cluster.elastic_check_s",
    "parallel.tp",
    "parallel.pp",
    "parallel.zero_stage",
    "parallel.micro_batch_size",
    "parallel.activation_checkpointing",
    "data.path",
    "data.skip_samples",  # only ranges past the resumed commit (the stream checks)
    "train.steps",
    "train.stop_at",
    "train.log_every",
    "train.torch_threads",
    "train.gc_every",
    "checkpoint.",
    "cluster.address",
    "cluster.max_failures",
    "cluster.cpus_per_worker",
    "cluster.resources_per_worker",
    "cluster.placement_strategy",
    "cluster.use_gpu",
    "cluster.lease_timeout_s",
    "cluster.hang_watchdog",
    "cluster.collective_timeout_s",
    "train.hang_",
    "train.straggler_",
    "data.prefetch",
    "tracking.uri",
)


def find_run(run: str, storage_path: str = "runs") -> Path:
    """A run by directory path, or by name under `storage_path`."""
    for candidate in (Path(run), Path(storage_path) / run):
        if (candidate / "config.yaml").is_file() and (candidate / "run.json").is_file():
            return candidate.resolve()
    raise RunError(
        f"no run {run!r}: neither {run} nor {Path(storage_path) / run} holds a run "
        "(config.yaml + run.json); give the run directory or --storage-path",
        path=run,
    )


def resume_training(
    run: str, overrides: list[str], storage_path: str = "runs", from_scratch: bool = False
) -> dict:
    """Continue a run from its newest committed checkpoint, same config, same MLflow run; with
    `from_scratch`, train again from step 0 a run that has no committed checkpoint."""
    t0 = time.perf_counter()
    from trainer.config import ConfigError, apply_overrides, from_dict, load_yaml

    run_dir = find_run(run, storage_path)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith(RESUMABLE_OVERRIDES):
            raise ConfigError(
                f"--set {key}: a resumed run keeps its model, data, batch and optimizer settings "
                f"(changing them would not continue the same run); start a new run instead. "
                f"Resume may change: {', '.join(RESUMABLE_OVERRIDES)}",
                field=key,
            )
    raw = load_yaml(run_dir / "config.yaml")
    raw.setdefault("train", {})["stop_at"] = 0  # a resume runs to train.steps unless told to stop again
    stored_storage = (raw.get("checkpoint") or {}).get("storage", "")
    cfg = from_dict(apply_overrides(raw, overrides))
    cfg = replace(cfg, cluster=replace(cfg.cluster, storage_path=str(run_dir.parent), run_name=run_dir.name))
    # Who writes the run is asked first (a running driver is named, whatever else is wrong), and
    # taken last, once every check has passed: a refused resume writes nothing. The S3 store (its
    # lease object, its commits) is asked only once it is known to be the run's own.
    lease = RunLease(run_dir, cfg.cluster.lease_timeout_s, cfg.checkpoint.storage)
    lease.check_file()
    check_corpus(cfg)
    check_storage_switch(run_dir, stored_storage, cfg.checkpoint.storage)
    lease.check_object()
    check_resume_point(run_dir, cfg.checkpoint.storage, from_scratch)
    record = read_run_record(run_dir)
    lease.acquire()
    with _released(lease):
        mlflow_run_id = record.get("mlflow_run_id", "")
        if cfg.tracking.enabled and mlflow_run_id:
            reopen_mlflow_run(cfg, mlflow_run_id)
        save_config(cfg, run_dir / "config.yaml")
        # tracking_uri: the one this attempt uses (resume may change it), without the credentials a
        # run recorded before they were kept out of the record.
        resumed = {
            "state": "running",
            "resumes": record.get("resumes", 0) + 1,
            "tracking_uri": cfg.tracking.uri,
        }
        write_run_record(run_dir, {**record, **resumed})
        _announce_mlflow_run(cfg, run_dir, mlflow_run_id)
        return _fit(cfg, run_dir, _known(mlflow_run_id), t0)


def check_storage_switch(run_dir: Path, stored: str, storage: str) -> None:
    """Refuse a resume that moves `checkpoint.storage` away from the store holding the run's
    commits: it would start again from step 0 there, and its retention could delete them."""
    name = run_dir.name
    if store_where(run_dir, storage) != store_where(run_dir, stored):
        held = newest_commit(run_dir, stored)
        if held is not None:
            raise RunError(
                f"--set checkpoint.storage={storage or '(empty)'}: run {name}'s committed checkpoints (newest: "
                f"step {held}) are in {store_where(run_dir, stored)}, and a run reads, writes and prunes "
                f"its checkpoints only in checkpoint.storage, so this resume would not continue from them "
                f"(it would train again from step 0, and its retention could delete them). Resume without "
                f"changing checkpoint.storage; to move the run, copy every step_<N>/ of "
                f"{store_where(run_dir, stored)} to {store_where(run_dir, storage)} (each commit.json last) "
                f"and then set checkpoint.storage in {run_dir / 'config.yaml'}; or start a new run there",
                field="checkpoint.storage",
            )


def check_resume_point(run_dir: Path, storage: str, from_scratch: bool) -> None:
    """Refuse a resume of a run without a commit unless `from_scratch`, and `from_scratch` on a run
    that has one (a resume always continues from it)."""
    name = run_dir.name
    newest = newest_commit(run_dir, storage)
    if newest is None and not from_scratch:
        raise RunError(
            f"run {name} has no committed checkpoint in {store_where(run_dir, storage)} (a commit.json whose "
            f"files are all there), so there is nothing to resume from: `pretrain resume {run_dir} "
            "--from-scratch` trains it again from step 0 (same run directory and MLflow run), or restore "
            "its checkpoints",
            path=store_where(run_dir, storage),
        )
    if newest is not None and from_scratch:
        raise RunError(
            f"--from-scratch: run {name} has a committed checkpoint (step {newest} in "
            f"{store_where(run_dir, storage)}) and a resume continues from it; drop --from-scratch, or "
            "start a new run to train from step 0",
            field="--from-scratch",
        )


def _fit(cfg: Config, run_dir: Path, mlflow_run: Future, t0: float) -> dict:
    """Run the worker group to the end; `t0` (perf_counter) is when this command began the run;
    `mlflow_run`: the MLflow run's id, perhaps still being created (run.json gets it then)."""
    ray = start_ray_logged(cfg, run_dir)
    from ray.train import TrainingFailedError

    from cluster.capacity import check_capacity

    mlflow_run_id = mlflow_run.result() if mlflow_run.done() else None  # None: workers read run.json
    cl = cfg.cluster
    use_gpu = cl.use_gpu == "true" or (cl.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    layouts = elastic_layouts(cfg)
    sizes = list(layouts)
    trainer = _make_trainer(cfg, run_dir, mlflow_run_id, use_gpu, layouts)
    state, error = "failed", ""
    # `pretrain stop` / a scheduler ends the driver with SIGTERM: turn it into an exception so the
    # run record and the MLflow run are closed below instead of staying "running".
    sigterm = _StopOnSigterm(run_dir)
    previous = signal.signal(signal.SIGTERM, sigterm) if _main_thread() else None
    try:
        # an elastic run starts at the largest valid size the cluster holds, at least its smallest
        check_capacity(replace(cfg, cluster=replace(cl, num_workers=sizes[-1])), ray, use_gpu=use_gpu)
        # From here Ray Train places and starts the workers: on a busy or autoscaling cluster the
        # wait for nodes shows as the gap between this event and the workers' `start`.
        EventLog(str(run_dir)).write("workers_requested", workers=cl.num_workers, min_workers=sizes[-1])
        watchdog = _start_watchdog(cfg, run_dir, lambda: _mlflow_run_id(mlflow_run))
        try:
            result = trainer.fit()
            mlflow_run_id = mlflow_run.result()  # its error, if the workers stopped for it
        except SystemExit:  # Ray Train's Ctrl-C handler gives up on an abort this way
            if not sigterm.received:
                raise
            sigterm.stop()
        except TrainingFailedError as e:  # Ray's word for it, as the user's error and in run.json
            if sigterm.received:  # the controller was aborted
                sigterm.stop()
            mlflow_run.result()  # the MLflow run's error comes first
            # A rank's failure that a restart would repeat (out of memory) ended the group.
            failure = _stopped_by_workers(group_stopped(str(run_dir)), run_dir)
            failure = failure or _training_failed(e, run_dir)
            error = str(failure)
            raise failure from None
        finally:
            if watchdog is not None:
                watchdog.stop()
        if sigterm.received:
            sigterm.stop()
        if result.error:
            raise RunError(
                f"run {run_dir.name} failed: {result.error}; continue it with `pretrain resume {run_dir}`"
            )
        stopped = _stopped_by_workers(getattr(result, "return_value", None), run_dir)
        if stopped is not None:  # every rank ended on the same expected failure: no restart
            error = str(stopped)
            raise stopped
        summary = json.loads((run_dir / "summary.json").read_text())
        state = "succeeded" if summary["steps"] >= cfg.train.steps else "stopped"
        return {
            **summary,
            "run_name": run_dir.name,
            "run_dir": str(run_dir),
            "wall_s": time.perf_counter() - t0,
            "mlflow_run_id": mlflow_run_id,
        }
    except PretrainError as e:
        state = "stopped" if isinstance(e, RunStopped) else state
        e.run_dir = str(run_dir)  # launch/errors.py keeps the traceback there
        ray.shutdown()  # stops the forwarding of worker lines, so that the error's message is the last
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _close_run(cfg, run_dir, _mlflow_run_id(mlflow_run, wait=True), state, error)


def _start_watchdog(cfg: Config, run_dir: Path, mlflow_run_id: Callable[[], str]):
    """The hang watchdog over this run's worker group (cluster/watchdog.py), unless turned off."""
    from cluster.watchdog import HangWatchdog
    from trainer.progress import STOP_RECORD

    (run_dir / STOP_RECORD).unlink(missing_ok=True)  # an earlier attempt's: this one starts afresh
    if not cfg.cluster.hang_watchdog:
        return None
    on_hang = None
    if cfg.tracking.enabled:

        def on_hang(path):
            if run_id := mlflow_run_id():
                log_hang_artifacts(cfg, run_id, path)

    return HangWatchdog(cfg, run_dir, on_hang).start()


def _record_ray_job(cfg: Config, run_dir: Path, mlflow_run_id: str) -> None:
    """The Ray job this driver runs in (if any), as an MLflow tag and in run.json."""
    if cfg.tracking.enabled and mlflow_run_id:
        tag_ray_job(cfg, mlflow_run_id)
    job = ray_job_id()
    if job:
        write_run_record(run_dir, {**json.loads((run_dir / "run.json").read_text()), "ray_job_id": job})


def elastic_layouts(cfg: Config) -> dict[int, tuple[int, int]]:
    """{group size: (tp, pp)} the run may take, largest first: only num_workers unless it is elastic."""
    from cluster.elastic import elastic, valid_layouts

    if not elastic(cfg):
        return {cfg.cluster.num_workers: (cfg.parallel.tp, cfg.parallel.pp)}
    from trainer.data.stream import open_manifest, train_stream

    streams = train_stream(cfg, open_manifest(cfg.data.path), dp_rank=0, dp_size=cfg.dp()).num_streams
    layouts = valid_layouts(cfg, streams)
    sizes = list(layouts)
    if sizes[-1] != cfg.cluster.min_workers:
        raise RunError(
            f"cluster.min_workers ({cfg.cluster.min_workers}) gives dp={cfg.dp(cfg.cluster.min_workers)}, which "
            f"does not divide the corpus's {streams} data streams (data.num_streams); set min_workers to one of "
            f"{', '.join(map(str, sizes))}",
            field="cluster.min_workers",
        )
    return layouts


def _make_trainer(cfg: Config, run_dir: Path, mlflow_run_id: str, use_gpu: bool, layouts: dict):
    """The Ray Train trainer of the run's worker group: placement, restarts, storage; elastic
    (Ray Train's (min, max) worker count) when the run has more than one size."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from cluster.backend import TorchEnvConfig
    from cluster.capacity import CapacityCheckBeforeStart
    from cluster.elastic import GROW_KEY, GroupSizes
    from cluster.ray_session import worker_main
    from cluster.watchdog import StopRecordCheckBeforeStart

    cl, sizes = cfg.cluster, list(layouts)
    resizable = len(sizes) > 1
    return trainer_class(GroupSizes(cfg, sizes, use_gpu).now if resizable else None, GROW_KEY)(
        worker_main,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "mlflow_run_id": mlflow_run_id,
            "use_gpu": use_gpu,
            "elastic_sizes": sizes if resizable else [],
            "elastic_layouts": {str(n): list(tp_pp) for n, tp_pp in layouts.items()} if resizable else {},
        },
        scaling_config=ScalingConfig(
            num_workers=(sizes[-1], sizes[0]) if resizable else cl.num_workers,
            elastic_resize_monitor_interval_s=cl.elastic_check_s,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cl.cpus_per_worker, **cl.resources_per_worker},
            placement_strategy=cl.placement_strategy,
        ),
        # Ray Train's own files for this run live beside ours, under <run_dir>/ray/.
        run_config=RunConfig(
            name="ray",
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=cl.max_failures),
            # a restart after a node left; a restart after a rank's failure that it would repeat
            callbacks=[CapacityCheckBeforeStart(cfg, use_gpu), StopRecordCheckBeforeStart(run_dir)],
            # Ray Train's own notes (worker group started, a failure's traceback again) stay in its
            # log files; the console keeps the run's lines and the errors of its workers.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        backend_config=TorchEnvConfig(),  # the loop creates the process group: nccl or gloo
    )


def _training_failed(e: Exception, run_dir: Path) -> RunError:
    """The user's error for Ray Train's TrainingFailedError `e`, with the command to continue."""
    resume = f"continue it with `pretrain resume {run_dir}`"
    cause = getattr(e, "controller_failure", None)
    if isinstance(cause, CapacityError):  # the controller's check before a restart: a node left
        return CapacityError(
            f"run {run_dir.name} failed and cannot restart its worker group: {cause}; once it can, {resume} "
            "(or now, on fewer workers: add `--set cluster.num_workers=N`, the checkpoint is converted)"
        )
    # An expected failure on a worker: its one message (the lowest rank's); tracebacks in errors/.
    failures = getattr(e, "worker_failures", None) or {}
    expected = [failures[r] for r in sorted(failures) if isinstance(failures[r], PretrainError)]
    if expected:
        where = save_traceback(str(run_dir), "driver", f"{e}\n")
        errors = f"; tracebacks in {Path(where).parent}" if where else ""
        failure = RunError(f"run {run_dir.name} failed: {expected[0]}{errors}; {resume}")
        failure.traceback_saved = bool(where)
        return failure
    return RunError(f"run {run_dir.name} failed: {e}; {resume}")


def _stopped_by_workers(value, run_dir: Path) -> RunError | None:
    """The user's error when the worker group ended on an expected failure that every rank agreed
    on and that a restart would repeat (a full disk at a save): rank 0 returned it."""
    if not isinstance(value, dict) or STOPPED_BY not in value:
        return None
    errors = run_dir / "errors"  # the ranks' tracebacks, when the disk took them
    where = f"; tracebacks in {errors}" if errors.is_dir() else ""
    failure = RunError(
        f"run {run_dir.name} failed: {value['message']}{where}; continue it with `pretrain resume {run_dir}`",
        field=value.get("field", ""),
        path=value.get("path", ""),
    )
    failure.traceback_saved = bool(where)
    return failure


def _close_run(cfg: Config, run_dir: Path, mlflow_run_id: str, state: str, error: str) -> None:
    """The run's final state in run.json and in MLflow (with its events), however it ended."""
    record = json.loads((run_dir / "run.json").read_text())
    try:
        write_run_record(run_dir, {**record, "state": state, **({"error": error} if error else {})})
    except OSError as e:  # a full disk must not hide the run's own error behind this one
        log.warning("could not record state %s in %s: %s", state, run_dir / "run.json", e)
    if cfg.tracking.enabled and mlflow_run_id:
        if (run_dir / "events.jsonl").exists():
            log_event_artifact(cfg, mlflow_run_id, run_dir / "events.jsonl")
        end_mlflow_run(cfg, mlflow_run_id, "FINISHED" if state != "failed" else "FAILED")
