"""Turns a plain model into the one this rank trains, in a fixed order (as torchtitan does):

1. tensor parallelism: layers swapped by module name for sharded ones (`parallel/tensor.py`),
   first, so that what follows wraps the layers this rank really runs,
2. activation checkpointing per block (recompute the block in backward),
3. torch.compile per block (the blocks share code and shapes, so one compiled graph serves all),
4. ZeRO partitioning (over the DP group only) happens afterwards, in `deepspeed.initialize`; under
   ZeRO-3 the model is already partitioned as it is built and the plan runs on it partitioned
   (`parallel/zero_init.py`).

The model file knows nothing of this: the plan sets `model.block_fn`, the single hook through
which every block is called.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from trainer.config import Config, ConfigError
from trainer.model import Transformer
from trainer.parallel.tensor import apply_tensor_parallel
from trainer.parallel.topology import Topology


def _checkpointed(block, x, cos, sin):
    return checkpoint(block, x, cos, sin, use_reentrant=False)


def apply_plan(model: Transformer, cfg: Config, topo: Topology | None = None) -> Transformer:
    if topo is not None and topo.tp > 1:
        model = apply_tensor_parallel(model, topo)
    if cfg.parallel.activation_checkpointing:
        model.block_fn = _checkpointed
    if cfg.train.compile:
        for block in model.blocks:
            block.compile(dynamic=False)
    return model


def check_device_switches(cfg: Config, device: torch.device) -> None:
    """GPU-only switches are refused on CPU with the field to change, never silently ignored."""
    if device.type != "cuda":
        if cfg.train.attention not in ("auto", "math"):
            raise ConfigError(
                f"train.attention={cfg.train.attention} is a CUDA kernel and this rank has no GPU; "
                "set train.attention: auto",
                field="train.attention",
            )


def sdpa_context(cfg: Config):
    """A context selecting the attention kernel, or a no-op for `auto`."""
    from contextlib import nullcontext

    if cfg.train.attention == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[cfg.train.attention]
    return sdpa_kernel([backend])
