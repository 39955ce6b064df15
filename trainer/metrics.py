"""Metrics behind a two-method interface: `log(metrics, step)` and `close()`.

`NullLogger` for ranks that do not log, `ConsoleLogger` for the human, `MlflowLogger` for the
run's MLflow run (created by the driver; workers only append to it, batched and in the
background, so a slow or absent tracking server never stalls a step). `start_system_metrics`
samples CPU/memory/GPU of a node into the same run.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
import urllib.parse

log = logging.getLogger("pretrain")

# Dense bf16 peak TFLOP/s (no sparsity), by substring of torch.cuda.get_device_name(), the first
# match counting: the PCIe and NVL parts run at lower clocks and power than the SXM ones.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.5,
    "H100 NVL": 835.5,
    "H200 NVL": 835.5,
    "H200": 989.4,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "4090": 165.0,
}


MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
_URI_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*:)(?P<password>[^@/\s]*)@")


def mask_uri_credentials(text: str) -> str:
    """`scheme://user:pass@host...` -> `scheme://user:***@host...` (anywhere in `text`)."""
    return _URI_CREDENTIALS.sub(lambda m: m["head"] + "***@", text)


def split_uri_credentials(uri: str) -> tuple[str, str, str | None]:
    """`scheme://user:pass@host/...` -> (`scheme://host/...`, user, password), the two
    percent-decoded; the password is None when the URI names no password (`scheme://user@host`),
    and the URI comes back as given, with ("", None), when it holds no user at all."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, "", None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return clean, urllib.parse.unquote(user), urllib.parse.unquote(password) if colon else None


def process_memory_gb(device_type: str = "cpu") -> float:
    """Memory this process holds, in GiB: the peak allocated by torch on the current GPU for
    `device_type="cuda"`, else the resident set size (RSS) of the process."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def detect_peak_tflops(device_type: str) -> float:
    """0.0 when unknown (CPU): MFU is then not reported rather than invented."""
    if device_type != "cuda":
        return 0.0
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' dense peak."""
    if peak_tflops <= 0:
        return 0.0
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * n_devices)


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block until what was logged is stored (or the timeout passes); True when it all was."""
        return True

    def close(self) -> None:
        pass


class ConsoleLogger(NullLogger):
    """One line per logged step; with `steps` (the run's train.steps), a line that timed a window
    also says how far the run is and how long the rest takes at that window's step time."""

    def __init__(self, stream=sys.stdout, steps: int = 0):
        self.stream, self.steps = stream, steps

    def log(self, metrics: dict[str, float], step: int) -> None:
        keys = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "val_loss")
        if not any(k in metrics for k in keys):  # a checkpoint's or a sampler's metrics only: no line
            return
        parts = [f"step {step}"]
        for k in keys:
            if k in metrics:
                v = metrics[k]
                parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        if self.steps and "step_time_s" in metrics:
            left = max(self.steps - step, 0) * metrics["step_time_s"]
            parts.append(f"{100 * step / self.steps:.0f}% of {self.steps} steps, {duration(left)} left")
        print(" | ".join(parts), file=self.stream, flush=True)


def duration(seconds: float) -> str:
    """`seconds` as a person reads a time left: 42s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# MLflow's first import, made by one thread at a time. Two threads of a process importing it at
# once (rank 0's metrics logger and its system-metrics sampler) can leave one of them with a
# partially initialized `mlflow.tracking` ("cannot import name '_get_store'"), and MLflow broken in
# that process for the rest of the run. Never held across a request to the store.
MLFLOW_IMPORT = threading.Lock()


class _TrackingStore:
    """Two calls against the run's tracking store, each bounded in time (no hidden retries):
    HTTP(S) stores through MLflow's REST API with `max_retries=0`, other stores (SQLite, files)
    through `MlflowClient`. Retrying is the caller's business."""

    def __init__(self, tracking_uri: str, request_timeout_s: float):
        self.uri = tracking_uri
        self.timeout = max(1, int(request_timeout_s))
        self.http = tracking_uri.startswith(("http://", "https://"))
        with MLFLOW_IMPORT:
            if self.http:
                from mlflow.utils.credentials import get_default_host_creds
                from mlflow.utils.rest_utils import http_request, verify_rest_response  # noqa: F401

                self.creds = get_default_host_creds(tracking_uri)
            else:
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(tracking_uri)

    def _request(self, method: str, endpoint: str, **kwargs) -> dict:
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        resp = http_request(
            self.creds, endpoint, method, max_retries=0, backoff_factor=0, timeout=self.timeout, **kwargs
        )
        return verify_rest_response(resp, endpoint).json()

    def last_steps(self, run_id: str) -> dict[str, int]:
        """Per metric key, the largest step the run already holds (from a previous attempt)."""
        if self.http:
            run = self._request("GET", "/api/2.0/mlflow/runs/get", params={"run_id": run_id})["run"]
            return {m["key"]: int(m.get("step", 0)) for m in run.get("data", {}).get("metrics", [])}
        return {m.key: m.step for m in self.client.get_run(run_id).data.to_proto().metrics}

    def log_batch(self, run_id: str, batch: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for k, v, ts, step in batch]
        if not self.http:
            self.client.log_batch(run_id, metrics=metrics)
            return
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.proto_json_utils import message_to_json

        body = message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics]))
        self._request("POST", "/api/2.0/mlflow/runs/log-batch", json=json.loads(body))


def _is_permanent(e: Exception) -> bool:
    """A request the store rejected (4xx but 429): sending it again cannot succeed."""
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return False
    status = e.get_http_status_code()
    return 400 <= status < 500 and status != 429


class MlflowLogger(NullLogger):
    """Appends metrics to an existing MLflow run, batched, from a background thread.

    `log()` only appends to an in-memory queue: it never blocks the step on the network and never
    raises. A thread sends the queue with `log_batch` (at most 1000 metrics per call) every
    `flush_every_s` or as soon as `batch_size` metrics wait. When the store does not answer,
    training goes on: metrics stay buffered (at most `max_buffered`, the oldest dropped beyond)
    and are sent again with backoff; one warning per outage. `close()` sends what is left, waiting
    at most `close_timeout_s`.

    Each (key, step) is sent at most once: per key, a step not above the last one queued (or the
    last one the run already holds, from an earlier attempt) is dropped, so metric steps must
    increase per key, which the loop's do.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        flush_every_s: float = 1.0,
        batch_size: int = MAX_METRICS_PER_BATCH,
        max_buffered: int = 100_000,
        close_timeout_s: float = 30.0,
        request_timeout_s: float = 10.0,
        max_backoff_s: float = 15.0,
        quiet_outages: bool = False,
    ):
        self.run_id = run_id
        # A second logger to the same run (system metrics) stays quiet: the training logger
        # already says once that the server is away.
        self._outage_log = log.debug if quiet_outages else log.warning
        self.uri_for_humans = mask_uri_credentials(tracking_uri)
        self.flush_every_s = flush_every_s
        self.batch_size = min(batch_size, MAX_METRICS_PER_BATCH)
        self.max_buffered = max_buffered
        self.close_timeout_s = close_timeout_s
        self.max_backoff_s = max_backoff_s
        # Opened by the thread on its first send (the first step's metrics): MLflow's import and a
        # store's set-up (CPU-seconds) then overlap the next steps instead of preceding the first;
        # a checkpoint's flush waits for them.
        self._store: _TrackingStore | None = None
        self._tracking_uri = tracking_uri
        self._request_timeout_s = request_timeout_s
        self._queue: collections.deque = collections.deque()  # log() -> thread; deque ops are atomic
        self._pending: collections.deque = collections.deque()  # the thread's own: not yet sent
        self._last_step: dict[str, int] | None = None  # None until read from the run
        self._outage_since: float | None = None
        self._failures = 0
        self._next_try = 0.0
        self._dropped = 0
        self.sent = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._deadline = float("inf")
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    # --- the training thread's side ---

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._closed:
            return
        try:
            now = int(time.time() * 1000)
            self._queue.extend((k, float(v), now, int(step)) for k, v in metrics.items())
            if len(self._queue) >= self.batch_size:
                self._wake.set()
        except Exception as e:  # a bad value must not kill training
            log.warning("MLflow: metrics of step %s not queued (%s)", step, e)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything logged so far is sent (True) or `timeout_s` passed (False)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and self._thread.is_alive():
            self._idle.clear()
            self._wake.set()
            if self._idle.wait(min(1.0, max(0.0, end - time.monotonic()))) and self.buffered() == 0:
                return True
        return self.buffered() == 0

    def buffered(self) -> int:
        """Metrics logged but not yet in the store."""
        return len(self._queue) + len(self._pending)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._deadline = time.monotonic() + self.close_timeout_s
        self._stop.set()
        self._wake.set()
        self._thread.join(self.close_timeout_s + self._request_timeout_s + 1)
        self._report_drops()
        if left := self.buffered():
            log.warning(
                "MLflow at %s: %d metrics could not be sent within %.0f s and are lost",
                self.uri_for_humans,
                left,
                self.close_timeout_s,
            )

    # --- the background thread ---

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self._drain()
                self._send()
            except Exception as e:  # never let the thread die with metrics in it
                log.warning("MLflow logger: unexpected error (%s); retrying", e)
            if not self._queue and not self._pending:
                self._idle.set()
            if stopping:
                if self.buffered() == 0 or time.monotonic() >= self._deadline:
                    return
                time.sleep(0.5)  # still failing: try again until the deadline (_stop is set)
                continue
            if self._outage_since is None:
                self._wake.wait(self.flush_every_s)
            else:  # backing off: a full queue still wakes the thread, which then only drains it
                self._wake.wait(max(0.1, self._next_try - time.monotonic()))
            self._wake.clear()

    def _drain(self) -> None:
        while self._queue:
            item = self._queue.popleft()
            if self._last_step is None:
                self._pending.append(item)
            elif self._keep(item):
                self._pending.append(item)
        if len(self._pending) > self.max_buffered:
            n = len(self._pending) - self.max_buffered
            for _ in range(n):
                self._pending.popleft()
            self._dropped += n

    def _keep(self, item: tuple[str, float, int, int]) -> bool:
        key, step = item[0], item[3]
        if step <= self._last_step.get(key, -1):
            return False
        self._last_step[key] = step
        return True

    def _send(self) -> None:
        if not self._pending:
            return
        if self._outage_since is not None and time.monotonic() < self._next_try and not self._stop.is_set():
            return
        try:
            if self._store is None:  # failing (MLflow broken, store unreachable) is an outage too
                self._store = _TrackingStore(self._tracking_uri, self._request_timeout_s)
            if self._last_step is None:
                self._last_step = self._store.last_steps(self.run_id)
                self._pending = collections.deque(i for i in self._pending if self._keep(i))
            while self._pending:
                batch = list(itertools.islice(self._pending, self.batch_size))
                try:
                    self._store.log_batch(self.run_id, batch)
                    self.sent += len(batch)
                except Exception as e:
                    if not _is_permanent(e):
                        raise
                    log.warning(
                        "MLflow rejected %d metrics (%s); they are dropped", len(batch), _first_line(e)
                    )
                for _ in batch:
                    self._pending.popleft()
        except Exception as e:
            self._failures += 1
            self._next_try = time.monotonic() + min(self.max_backoff_s, 2.0 ** min(self._failures - 1, 30))
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                self._outage_log(
                    "MLflow at %s does not answer (%s); training goes on, metrics are kept "
                    "(at most %d, the oldest dropped beyond) and sent when it is back",
                    self.uri_for_humans,
                    _first_line(e),
                    self.max_buffered,
                )
            return
        if self._outage_since is not None:
            self._outage_log(
                "MLflow at %s answers again after %.0f s; buffered metrics sent",
                self.uri_for_humans,
                time.monotonic() - self._outage_since,
            )
            self._report_drops()
        self._outage_since, self._failures = None, 0

    def _report_drops(self) -> None:
        if self._dropped:
            log.warning(
                "MLflow: dropped the %d oldest metrics: more than %d waited to be sent to %s",
                self._dropped,
                self.max_buffered,
                self.uri_for_humans,
            )
            self._dropped = 0


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return mask_uri_credentials(text[0] if text else type(e).__name__)[:300]


class MultiLogger(NullLogger):
    def __init__(self, *loggers: NullLogger):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def flush(self, timeout_s: float = 30.0) -> bool:
        return all([lg.flush(timeout_s) for lg in self.loggers])

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class SystemMetrics:
    """CPU, memory, disk, network and (NVIDIA/AMD) GPU of this node, sampled every `interval_s`
    by MLflow's system-metrics monitors and logged as `system/<node_id>/...` through an
    `MlflowLogger` (so an outage of the tracking server neither stops nor blocks it). The step is
    the sample number, continuing after the run's last one on a restart. Everything, the first
    contact with the store included, happens on a background thread."""

    def __init__(self, tracking_uri: str, run_id: str, node_id: str, interval_s: float = 10.0):
        self.tracking_uri, self.run_id, self.node_id = tracking_uri, run_id, node_id
        self.interval_s = interval_s
        self.logger = MlflowLogger(
            tracking_uri, run_id, flush_every_s=min(2.0, interval_s), quiet_outages=True
        )
        self.prefix = "system/" + (f"{node_id}/" if node_id else "")
        self.step = 0
        self._monitor = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def _open_monitor(self) -> None:
        import psutil

        with MLFLOW_IMPORT:  # and the store's modules: a client makes the store, no request
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            from mlflow.tracking import MlflowClient

            MlflowClient(self.tracking_uri)
        # Checked against MLflow 3.17: the constructor reads the run's last system step
        # (resume_logging: a request, retried while the server is away, so outside the lock) and
        # picks the GPU monitor that works; we drive the sampling ourselves.
        # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL / _NODE_ID, when set, win as in MLflow.
        monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.interval_s,
            resume_logging=True,
            node_id=self.node_id or None,
            tracking_uri=self.tracking_uri,
        )
        self.interval_s = float(monitor.sampling_interval)
        self.prefix = "system/" + (f"{monitor.node_id}/" if monitor.node_id else "")
        self.step = int(getattr(monitor, "_logging_step", 0))
        psutil.cpu_percent()  # the first reading only sets the reference point
        self._monitor = monitor

    def sample(self) -> dict[str, float]:
        self._monitor.collect_metrics()
        metrics = self._monitor.aggregate_metrics()
        for m in self._monitor.monitors:
            m.clear_metrics()
        return {self.prefix + k: float(v) for k, v in metrics.items()}

    def _run(self) -> None:
        warned = False
        while True:
            try:
                if self._monitor is None:
                    self._open_monitor()
                elif not self._stop.is_set():
                    self.logger.log(self.sample(), self.step)
                    self.step += 1
            except Exception as e:
                if not warned:
                    log.warning("system metrics: sampling failed (%s); will keep trying", _first_line(e))
                    warned = True
            if self._stop.wait(self.interval_s):
                return

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        self.logger.close_timeout_s = timeout_s
        self.logger.close()


def start_system_metrics(
    tracking_uri: str, run_id: str, node_id: str, interval_s: float = 10.0
) -> SystemMetrics:
    """Start sampling this node's system metrics into MLflow run `run_id` (call from one process per
    node, e.g. local rank 0, with a distinct `node_id` such as `node0`)."""
    return SystemMetrics(tracking_uri, run_id, node_id, interval_s)


def stop_system_metrics(handle: SystemMetrics | None, timeout_s: float = 10.0) -> None:
    """Stop sampling and send what is left, waiting at most about `timeout_s`; None is a no-op."""
    if handle is not None:
        handle.stop(timeout_s)
