"""DeepSpeed engine for one rank: the DeepSpeed config derived from ours, optimizer, LR schedule.

The LR schedule is a pure function of the step (set on the optimizer before each step), so it
needs no state of its own in a checkpoint and resumes exactly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
import sys
import warnings

import torch
from torch import nn

from trainer.config import Config, OptimConfig
from trainer.parallel.zero_params import full_shape


def precision(cfg: Config, device: torch.device) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


def deepspeed_config(cfg: Config, world_size: int, device: torch.device) -> dict:
    p = cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.zero_stage == 3:
        # Keep every parameter partitioned between uses; DeepSpeed's defaults keep up to 1e9
        # elements live, which hides ZeRO-3's memory savings on small and medium models.
        zero.update(
            {
                "overlap_comm": device.type == "cuda",
                "contiguous_gradients": True,
                "stage3_param_persistence_threshold": 0,
                "stage3_max_live_parameters": int(1e8),
                "stage3_prefetch_bucket_size": int(5e7),
            }
        )
    return {
        "train_batch_size": p.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision(cfg, device) == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if len(full_shape(p)) >= 2 else no_decay).append(p)  # matrices decay
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# torch's `Adam.step` as written, without `_use_grad_for_differentiable` (None on a torch that
# changed it): that wrapper sets grad mode and imports `torch._dynamo` for a `graph_break()`
# that only matters when the step is compiled, and ours never is.
_ADAM_STEP = getattr(torch.optim.AdamW.step, "__wrapped__", None)


class AdamW(torch.optim.AdamW):
    """torch's AdamW, whose first step does not import `torch._dynamo` (CPU-seconds on every rank at
    start-up; see trainer/lazy_dynamo.py). Same update, same hooks: only the grad mode is set here
    instead of in torch's wrapper."""

    if _ADAM_STEP is not None:

        @torch.no_grad()
        def step(self, closure=None):
            return _ADAM_STEP(self, closure)


def make_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    # torch's own AdamW: its fused kernel when asked, on GPU or CPU (no extension to compile),
    # else torch's default (foreach on GPU, one tensor at a time on CPU). DeepSpeed's ZeRO
    # accepts it as a supported optimizer.
    return AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=o.fused,
    )


def lr_at(step: int, o: OptimConfig, total_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at total_steps (step is 0-based)."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, total_steps - o.warmup_steps)
    frac = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# Two imports on DeepSpeed's start path cost each rank CPU-seconds for features training here never
# uses (measured by `python benchmarks/startup.py`).
@contextlib.contextmanager
def _without_mlflow():
    """`import deepspeed` imports MLflow for its autotuner to log tuning trials to; every
    rank pays, though only rank 0 logs, through our own tracking. Within this block MLflow cannot
    be imported (the autotuner, which we never run, sees it as not installed); after it, MLflow
    imports as usual. A no-op once MLflow is imported."""
    if "mlflow" in sys.modules:
        yield
        return
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # Python's "import blocked" marker
    try:
        yield
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]


def _import_deferring_compile(name: str) -> None:
    """Import module `name` with each `torch.compile` it applies as it loads deferred to the
    compiled function's first call. DeepSpeed imports its Muon optimizer module in every optimizer
    set-up, only to check `isinstance(optimizer, MuonWithAuxAdam)`, and that module wraps three
    kernels in `torch.compile` at import, which imports all of inductor. Compilation itself
    already waits for the first call; this moves only the wrapping, so nothing else changes."""
    if name in sys.modules:
        return
    real = torch.compile

    def deferred(model=None, **kwargs):
        if model is None:  # @torch.compile(mode=...) form
            return lambda fn: deferred(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)

        return call

    torch.compile = deferred
    try:
        importlib.import_module(name)
    except ImportError:  # a DeepSpeed without it: nothing to import early
        pass
    finally:
        torch.compile = real


def setup_deepspeed(device: torch.device, local_rank: int = 0):
    """Import DeepSpeed for this device and attach it to the existing process group; the module.
    Needed before anything that makes DeepSpeed process groups (a `PipelineModule`)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Its CPU accelerator counts a node's "devices" as the ranks on it, which DeepSpeed's own
        # launcher passes as LOCAL_SIZE; without it, it asks `numactl --hardware` every time.
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed's sanity check reads it
    with _without_mlflow():  # after DS_ACCELERATOR is set: DeepSpeed picks its accelerator on import
        import deepspeed
    _import_deferring_compile("deepspeed.runtime.zero.muon.original_muon")
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    if AdamW not in ZERO_SUPPORTED_OPTIMIZERS:  # ZeRO checks the exact type; ours is torch's AdamW
        ZERO_SUPPORTED_OPTIMIZERS.append(AdamW)

    # torch 2.13 renamed the collectives DeepSpeed calls; the warning repeats every ZeRO step.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu":
        # DeepSpeed's CPU comm backend JIT-compiles its shared-memory all-reduce when it starts
        # (a C++ build, repeated whenever another DeepSpeed install on the machine rebuilt the
        # shared torch extensions cache). Only its inference all-reduce uses that op; training
        # collectives go through torch.distributed (gloo) either way. The table is set, not read:
        # reading it first probes every op DeepSpeed has, which compiles and links a C program
        # (its async-io check) on every rank of every run.
        vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return deepspeed


def initialize(
    cfg: Config, model: nn.Module, world_size: int, device: torch.device, local_rank: int = 0, mpu=None
):
    """Wrap `model` in a DeepSpeed engine. The process group must already exist. `mpu` (a
    `Topology.mpu`, with tensor parallelism) makes ZeRO partition and average over the DP group.
    A `PipelineModule` (which carries its own grid) gets DeepSpeed's `PipelineEngine`."""
    deepspeed = setup_deepspeed(device, local_rank)
    # DeepSpeed keeps the last engine's mpu in a module global and never clears it: an engine
    # built later in the same process without one must not inherit stale process groups.
    deepspeed.utils.groups.mpu = mpu
    model = model.to(device)
    optimizer = make_optimizer(model, cfg.optim)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, world_size, device),
        mpu=mpu,
        dist_init_required=False,
    )
    if cfg.parallel.zero_stage == 0 and not hasattr(engine, "grid"):
        # DeepSpeed's fp32 ZeRO-0 path clips without keeping the norm: `get_global_grad_norm()`
        # would return nothing.
        clip_fp32_gradients_over(engine, engine.mpu)
        if engine.dp_world_size == 1:
            # One data-parallel rank: nothing to average, yet DeepSpeed would flatten every gradient
            # into buckets, all-reduce them over a group of one and copy them back each step (two
            # extra passes over the gradients).
            engine.enable_backward_allreduce = False
    return engine, optimizer


def clip_fp32_gradients_over(engine, mpu) -> None:
    """Replace the engine's fp32 gradient clip (DeepSpeed's private `clip_fp32_gradients`) by
    DeepSpeed's own `clip_grad_norm_` over `mpu`, keeping the norm for `get_global_grad_norm()`."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = float(
            clip_grad_norm_(engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=mpu)
        )

    engine.clip_fp32_gradients = clip_fp32_gradients
