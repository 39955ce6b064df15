"""Metrics behind a two-method interface: `log(metrics, step)` and `close()`.

`NullLogger` for ranks that do not log, `ConsoleLogger` for the human, `MlflowLogger` for the
run's MLflow run (created by the driver; workers only append to it).
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("pretrain")

# Dense bf16 peak TFLOP/s (no sparsity), by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


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

    def close(self) -> None:
        pass


class ConsoleLogger(NullLogger):
    def __init__(self, stream=sys.stdout):
        self.stream = stream

    def log(self, metrics: dict[str, float], step: int) -> None:
        keys = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "val_loss")
        parts = [f"step {step}"]
        for k in keys:
            if k in metrics:
                v = metrics[k]
                parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        print(" | ".join(parts), file=self.stream, flush=True)


class MlflowLogger(NullLogger):
    """Appends metrics to an existing MLflow run in batches."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as e:  # tracking must never kill training
            log.warning("MLflow logging failed at step %d (%s); continuing", step, e)


class MultiLogger(NullLogger):
    def __init__(self, *loggers: NullLogger):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
