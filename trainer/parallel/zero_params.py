"""Reading parameters that ZeRO-3 may hold partitioned: their full shape, and a block in which they
are whole. Plain torch plus DeepSpeed's public API, so any module may import it (the model build,
the TP swap and the optimizer's parameter groups all do)."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also while ZeRO-3 holds only a partition of it (then `p.shape` is (0,))."""
    return getattr(p, "ds_shape", p.shape)


def gathered(params):
    """A block inside which ZeRO-3-partitioned `params` are whole (to read, not to modify); a no-op
    for parameters that are not partitioned."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
