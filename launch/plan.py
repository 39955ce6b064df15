"""`pretrain plan CONFIG [--set ...]`: a layout on paper, before anything runs.

Prints the resolved layout (world = pp x dp x tp and the global ranks of every TP, DP and PP
group), the parameter count, the training FLOPs per token, and an estimate of memory per device
(parameters, gradients, optimizer state, activations, logits) from `trainer.parallel.estimate`.
Starts no process group and touches no device. An invalid layout exits 2 with the config's message.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from launch.args import add_config

MAX_GROUPS_SHOWN = 8


def _groups(groups: list[list[int]]) -> str:
    shown = " ".join(str(g).replace(" ", "") for g in groups[:MAX_GROUPS_SHOWN])
    more = len(groups) - MAX_GROUPS_SHOWN
    return f"{shown} ... ({more} more)" if more > 0 else shown


def _vocab_from_corpus(cfg):
    """The config with model.vocab_size read from the corpus manifest when it says 0, validated
    again (tp must divide it); None when the manifest cannot be read."""
    from trainer.data.storage import Retry
    from trainer.data.stream import open_manifest

    try:
        manifest = open_manifest(cfg.data.path, Retry(tries=1, timeout_s=5.0))
    except (OSError, ValueError):
        return None
    return replace(cfg, model=replace(cfg.model, vocab_size=manifest.vocab_size)).validate()


def describe_plan(cfg) -> list[str]:
    """The lines `pretrain plan` prints for a validated config."""
    from trainer.model import flops_per_token, param_count
    from trainer.parallel.estimate import GB, build_memory, estimate_for_config, fmt_count, resolved_precision
    from trainer.parallel.topology import Topology

    p, world = cfg.parallel, cfg.cluster.num_workers
    topo = Topology(world, rank=0, tp=p.tp, pp=p.pp)  # pure arithmetic: no process group
    prec = resolved_precision(cfg)
    lines = [
        f"layout: world {world} = pp {topo.pp} x dp {topo.dp} x tp {topo.tp} "
        "(tp innermost: consecutive ranks; then dp; then pp)",
        f"  ZeRO-{p.zero_stage}, {prec}, micro batch {p.micro_batch_size} x grad accum {cfg.grad_accum()} "
        f"x dp {topo.dp} = global batch {p.global_batch_size} sequences of {cfg.data.seq_len} tokens",
        f"  tp groups ({len(topo.tp_groups())}): {_groups(topo.tp_groups())}",
        f"  dp groups ({len(topo.dp_groups())}): {_groups(topo.dp_groups())}",
        f"  pp groups ({len(topo.pp_groups())}): {_groups(topo.pp_groups())}",
    ]
    if topo.pp > 1:
        lines.append(f"  metrics logged by rank {topo.logging_rank} (first rank of the last stage)")

    if cfg.model.vocab_size == 0:
        resolved = _vocab_from_corpus(cfg)
        if resolved is None:
            lines.append(
                f"parameters: model.vocab_size is 0 and the corpus manifest at {cfg.data.path!r} cannot be "
                "read; give --set model.vocab_size=N for the parameter count, FLOPs and memory"
            )
            return lines
        cfg = resolved
        lines.append(f"vocab_size: {cfg.model.vocab_size} (from the corpus manifest at {cfg.data.path})")

    m = cfg.model
    n = param_count(m)
    lines += [
        f"parameters: {n:,} ({fmt_count(n)}; {m.arch}, {m.n_layers} layers, d_model {m.d_model}, "
        f"{m.n_heads} heads / {m.kv_heads} kv, d_ff {m.ff_dim}, vocab {m.vocab_size})",
        f"flops per token: {flops_per_token(m, cfg.data.seq_len):.4g} (training, 6N + 12*L*H*Q*T, "
        f"seq {cfg.data.seq_len})",
    ]

    stages = estimate_for_config(cfg)
    lines.append(
        f"memory per device, estimate in GB (ZeRO-{p.zero_stage} over dp {topo.dp}, {prec}, "
        f"activation checkpointing {'on' if p.activation_checkpointing else 'off'}):"
    )
    header = f"  {'stage':>5} {'blocks':>6} {'params':>8} {'grads':>8} {'optimizer':>9} {'activations':>11}"
    lines.append(header + f" {'logits':>8} {'total':>8}")
    for e in stages:
        g = e.gb()
        lines.append(
            f"  {e.stage:>5} {e.blocks:>6} {g['params']:>8.2f} {g['grads']:>8.2f} {g['optimizer']:>9.2f} "
            f"{g['activations']:>11.2f} {g['logits']:>8.2f} {g['total']:>8.2f}"
        )
    lines.append(
        "  (activations per micro batch, Korthikanti et al. 2022; not counted: allocator, "
        "communication buffers, CUDA context)"
    )
    built = build_memory(cfg)
    how = (
        "partitioned as it is built (ZeRO-3, deepspeed.zero.Init)"
        if built.partitioned
        else "whole on every rank first"
    )
    lines.append(
        f"model build (fp32, before training): {how}: {built.host / GB:.2f} GB host and "
        f"{built.device / GB:.2f} GB device per rank at most"
    )
    return lines


def run_plan(args: argparse.Namespace) -> int:
    from trainer.config import load_config

    print("\n".join(describe_plan(load_config(args.config, args.set))))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "configs/llama-1b.yaml", "parallel.tp=2")
