"""Pipeline parallelism: the model as a DeepSpeed `PipelineModule`, trained 1F1B by `train_batch`.

The layer list is the model's own layout, one `LayerSpec` per piece:

    [embed, block 0, ..., block L-1, head]      (B, T) ids -> (B, T, D) -> ... -> (B, T, V[/tp]) logits

cut into `pp` stages balanced by parameter count. Each spec adopts the corresponding module of the
full plain model, built with the same seed on every rank (and already through the plan: TP swap,
activation checkpointing via `block_fn`, compile), so every layout starts from exactly the same
function as one plain process. The cost is that every rank builds the whole model once before
keeping its stage; a model too big for that needs a meta-device build first.

Between stages only the (B, T, D) hidden state travels: each block stage holds the rotary tables
itself (the model's non-persistent buffers, so never in a checkpoint). Labels go straight to the
last stage, which computes the loss (`cross_entropy`, or the vocab-parallel one under TP).

Tied embeddings (one matrix on the first and the last stage) would need DeepSpeed's
`TiedLayerSpec`; the config check refuses `model.tie_embeddings` with `parallel.pp > 1`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from trainer import library_internals as internals
from trainer.config import Config, ConfigError
from trainer.engine import initialize, setup_deepspeed
from trainer.model import Transformer
from trainer.parallel.topology import Topology


class ModuleStage(nn.Module):
    """One module of the model run as it is, kept under its name in the model (`embed`: (B, T) ids
    -> (B, T, D); `head`: final norm + output projection, (B, T, D) -> (B, T, V) logits, V/tp under
    TP), so a pipeline checkpoint names its parameters as the plain model does."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__()
        self.name = name
        self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


class BlockStage(nn.Module):
    """One transformer block: (B, T, D) -> (B, T, D), with its own copy of the rotary tables."""

    def __init__(self, block: nn.Module, rope_cos: torch.Tensor, rope_sin: torch.Tensor, block_fn=None):
        super().__init__()
        self.block, self.block_fn = block, block_fn
        self.register_buffer("rope_cos", rope_cos, persistent=False)  # (max T, Dh/2)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        return self.block_fn(self.block, x, cos, sin) if self.block_fn else self.block(x, cos, sin)


def pipeline_layers(model: Transformer) -> list:
    """The model as a list of `LayerSpec`s, each adopting one of its modules."""
    from deepspeed.pipe import LayerSpec

    return [
        LayerSpec(ModuleStage, "embed", model.embed),
        *(LayerSpec(BlockStage, b, model.rope_cos, model.rope_sin, model.block_fn) for b in model.blocks),
        LayerSpec(ModuleStage, "head", model.head),
    ]


def build_pipeline_engine(
    cfg: Config,
    model: Transformer,
    topo: Topology,
    device: torch.device,
    local_rank: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
):
    """This rank's stage of `model` (already through the plan) in a DeepSpeed `PipelineEngine`, and
    its optimizer. ZeRO-0/1 partition over the DP group of the stage."""
    from trainer.model import cross_entropy

    if model.cfg.tie_embeddings:
        raise ConfigError(
            "model.tie_embeddings is not supported with parallel.pp > 1; set it to false",
            field="model.tie_embeddings",
        )
    setup_deepspeed(device, local_rank)  # PipelineModule makes DeepSpeed process groups
    from deepspeed.pipe import PipelineModule

    pipe = PipelineModule(
        layers=pipeline_layers(model),
        topology=topo.deepspeed_topology(),
        loss_fn=loss_fn or cross_entropy,
        partition_method="parameters",
        activation_checkpoint_interval=0,  # the blocks checkpoint themselves (the plan's block_fn)
    )
    parts = pipe.parts  # stage s runs layers [parts[s], parts[s+1])
    if any(parts[s + 1] <= parts[s] for s in range(topo.pp)):
        raise ConfigError(
            f"parallel.pp={topo.pp} leaves a pipeline stage without layers (partition {parts} of "
            f"{parts[-1]} layers by parameter count); lower parallel.pp or add model.n_layers",
            field="parallel.pp",
        )
    engine, optimizer = initialize(cfg, pipe, topo.world_size, device, local_rank)
    _count_every_stage_in_the_clip_norm(engine)
    return engine, optimizer


class _TensorParallelRanks:
    """The two questions DeepSpeed's fp32 gradient clip asks of an mpu, answered Megatron's way:
    "model parallel rank" = the TP rank (replicated parameters count once per TP group, on every
    stage), summed over the stage x TP group."""

    def __init__(self, grid):
        self.grid = grid

    def get_model_parallel_rank(self) -> int:
        return self.grid.get_slice_parallel_rank()

    def get_model_parallel_group(self):
        return self.grid.get_model_parallel_group()


def _count_every_stage_in_the_clip_norm(engine) -> None:
    """Without ZeRO (and without bf16), DeepSpeed 0.19 clips with `clip_grad_norm_(mpu=grid)`, which
    counts a replicated parameter only where `grid.get_model_parallel_rank() == 0`: the grid's rank
    in the stage x TP group, so only stage 0's parameters enter the norm and later stages are clipped
    by the wrong coefficient. (ZeRO-1 and bf16 ask for the TP rank and are right.) The grid's own
    answer must stay as it is: it also numbers the per-stage checkpoint files."""
    internals.keep_fp32_grad_norm(engine, _TensorParallelRanks(engine.grid))


def pipeline_step(engine, batches: Iterable, accum: int) -> torch.Tensor:
    """One optimizer step under PP: `accum` (x, y) micro batches taken from `batches` on every rank
    (stages use what they need: ids on the first, labels on the last), run 1F1B by `train_batch`.
    Returns this DP rank's mean loss over its micro batches, on every stage (the engine broadcasts
    it from the last stage), detached."""
    micro = list(itertools.islice(iter(batches), accum))
    if len(micro) < accum:
        raise RuntimeError(f"the data ran out: {len(micro)} of {accum} micro batches for this step")
    engine.train_batch(iter(micro))
    return engine.dp_group_loss.detach().float()
