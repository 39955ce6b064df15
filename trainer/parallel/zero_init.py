"""Building the model this rank trains; under ZeRO-3, partitioned as it is built (`deepspeed.zero.Init`).

Without ZeRO-3 (and under PP, which DeepSpeed limits to ZeRO 0-1) the model is built whole and the
plan applied to it. With ZeRO-3 every parameter is partitioned the moment its layer has been built,
so the model never exists whole on one rank; at most one parameter (one layer, for a TP swap) is
gathered at a time. The weights are bitwise the ones the whole build gives with the same seed:

1. Under `zero.Init` over all ranks of the (pp=1) world, `Transformer(init=False)` is built: each
   layer draws its default init on the CPU, exactly as the whole build does, and is partitioned.
2. The init pass (`init_parameter`, in `named_parameters` order, the same random draws as the whole
   build's `init_weights`) fills one CPU tensor of the parameter's full shape at a time, copied into
   the gathered parameter; rank 0's copy is broadcast and the parameter partitioned again.
3. The plan (`apply_plan`) under `zero.Init` over the DP group. With TP, each swapped layer is
   gathered while `_swap` slices this rank's shard from it; the new TP layer's parameters are
   partitioned over the DP group as it is built. Replicated parameters (norms, biases of row-parallel
   layers) are then moved from the world partition to the DP one. Partitioning the whole-model step
   over the world rather than the DP group keeps its share at 1/(dp*tp), what training holds after.
   Without TP the world is the DP group and step 3 moves nothing.
4. With bf16 the partitions are cast, as `deepspeed.initialize` casts a whole model (the init pass
   draws in fp32 either way).

`deepspeed.initialize` then sees parameters that already carry `ds_id` and partitions nothing again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import Config
from trainer.engine import deepspeed_config, precision, setup_deepspeed
from trainer.model import Transformer, init_parameter
from trainer.parallel.plan import apply_plan
from trainer.parallel.topology import Topology
from trainer.parallel.zero_params import gathered


def build_model(cfg: Config, topo: Topology, device: torch.device, local_rank: int = 0) -> Transformer:
    """The model this rank trains, plan applied; partitioned under ZeRO-3. Seed torch first: every
    rank must draw the same initial weights."""
    if not cfg.parallel.partitioned_build:
        return apply_plan(Transformer(cfg.model), cfg, topo)
    deepspeed = setup_deepspeed(device, local_rank)
    # No tensor overrides: layers draw their default init on the CPU in fp32, as the whole build
    # does (DeepSpeed's would create them on the device, in the training dtype). The mpu only lets
    # DeepSpeed check the batch arithmetic against the DP size.
    init_args = {
        "config_dict_or_path": deepspeed_config(cfg, topo.world_size, device),
        "mpu": topo.mpu if topo.tp > 1 else None,
        "tensor_overrides": [],
    }

    with deepspeed.zero.Init(data_parallel_group=dist.group.WORLD, **init_args):
        model = Transformer(cfg.model, init=False)
    for name, p in model.named_parameters():
        full = torch.empty(p.ds_shape, dtype=torch.float32)  # on the CPU: the whole build's draws
        init_parameter(name, full, cfg.model)
        with deepspeed.zero.GatheredParameters(p, modifier_rank=0):
            p.data.copy_(full)
    with deepspeed.zero.Init(data_parallel_group=topo.dp_group, **init_args):
        model = apply_plan(model, cfg, topo)  # TP layers are partitioned over the DP group as built
        if topo.dp_group is not dist.group.WORLD:
            _move_to_group(
                model,
                topo.dp_group,
                lambda m: deepspeed.zero.Init(module=m, data_parallel_group=topo.dp_group, **init_args),
            )
    if precision(cfg, device) == "bf16":
        for p in model.parameters():
            p.ds_tensor.data = p.ds_tensor.data.to(torch.bfloat16)
            p.data = p.data.to(torch.bfloat16)
    return model


def _move_to_group(model: nn.Module, group, convert) -> None:
    """Re-partition over `group` every parameter partitioned over another one: gathered whole, one
    at a time, replaced by a fresh copy that `convert(module)` partitions. Ties stay tied."""
    fresh: dict[int, nn.Parameter] = {}
    for module in list(model.modules()):
        stale = [(n, p) for n, p in module.named_parameters(recurse=False) if p.ds_process_group is not group]
        if not stale:
            continue
        for n, p in stale:
            if id(p) not in fresh:
                with gathered([p]):
                    fresh[id(p)] = nn.Parameter(p.data.clone(), requires_grad=p.requires_grad)
            setattr(module, n, fresh[id(p)])
        convert(module)
