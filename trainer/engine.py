"""DeepSpeed engine for one rank: the DeepSpeed config derived from ours, optimizer, LR schedule.

The LR schedule is a pure function of the step (set on the optimizer before each step), so it
needs no state of its own in a checkpoint and resumes exactly.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import torch
from torch import nn

from trainer import library_internals as internals
from trainer.config import Config, OptimConfig
from trainer.model import Block
from trainer.parallel.zero_params import full_shape

# The module ZeRO-3 gathers whole, with its parameters' hooks on it alone (DeepSpeed's `leaf_module`).
ZERO3_FETCH_UNIT = f"{Block.__module__}.{Block.__qualname__}"


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
                # Each transformer block is one fetch unit (FSDP's per-block wrapping): one gather and
                # one set of hooks per block instead of per linear and norm, whose Python bookkeeping
                # is most of ZeRO-3's cost over ZeRO-0 on CPU. At most one block (plus prefetch) is
                # live, the memory ZeRO-3 keeps at any model size.
                "leaf_module": {"classes": [ZERO3_FETCH_UNIT]},
            }
        )
    return {
        "train_batch_size": p.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # The loop's anomaly guard makes the one agreed finite check before every step (trainer/
        # anomaly.py); DeepSpeed's own would scan each gradient again and wait on the GPU for it.
        "bf16": {"enabled": precision(cfg, device) == "bf16", "check_grad_overflow": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": False,
        # Checkpoint tags are step numbers every rank agrees on: no two all-reduces per save to check them.
        "checkpoint": {"tag_validation": "Ignore"},
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


def make_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    # torch's own AdamW: its fused kernel when asked, on GPU or CPU (no extension to compile),
    # else torch's default (foreach on GPU, one tensor at a time on CPU). DeepSpeed's ZeRO
    # accepts it as a supported optimizer.
    return internals.AdamW(
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


def setup_deepspeed(device: torch.device, local_rank: int = 0):
    """Import DeepSpeed for this device and attach it to the existing process group; the module.
    Needed before anything that makes DeepSpeed process groups (a `PipelineModule`)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Its CPU accelerator counts a node's "devices" as the ranks on it, which DeepSpeed's own
        # launcher passes as LOCAL_SIZE; without it, it asks `numactl --hardware` every time.
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed's sanity check reads it
    with internals.without_mlflow():  # after DS_ACCELERATOR is set: DeepSpeed picks its accelerator on import
        import deepspeed
    internals.import_deferring_compile("deepspeed.runtime.zero.muon.original_muon")
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    # ZeRO checks the exact type and warns "untested optimizer" otherwise; ours is torch's AdamW.
    if internals.AdamW not in ZERO_SUPPORTED_OPTIMIZERS:
        ZERO_SUPPORTED_OPTIMIZERS.append(internals.AdamW)

    # torch 2.13 renamed the collectives DeepSpeed calls; the warning repeats every ZeRO step.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu":
        internals.skip_shm_comm_build(deepspeed)

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return deepspeed


def initialize(
    cfg: Config, model: nn.Module, world_size: int, device: torch.device, local_rank: int = 0, mpu=None
):
    """Wrap `model` in a DeepSpeed engine. The process group must already exist. `mpu` (a
    `Topology.mpu`, with tensor parallelism) makes ZeRO partition and average over the DP group.
    A `PipelineModule` (which carries its own grid) gets DeepSpeed's `PipelineEngine`."""
    deepspeed = setup_deepspeed(device, local_rank)
    internals.reset_stale_mpu(deepspeed, mpu)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg.optim)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, world_size, device),
        mpu=mpu,
        dist_init_required=False,
    )
    internals.multi_tensor_zero_step(engine.optimizer)  # ZeRO-1/2: no per-parameter norm or sync
    if cfg.parallel.zero_stage == 0 and not hasattr(engine, "grid"):
        internals.keep_fp32_grad_norm(engine, engine.mpu)
        if engine.dp_world_size == 1:
            # One data-parallel rank: nothing to average, yet DeepSpeed would flatten every gradient
            # into buckets, all-reduce them over a group of one and copy them back each step.
            engine.enable_backward_allreduce = False
    return engine, optimizer
