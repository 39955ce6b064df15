"""Resume a committed checkpoint on a different layout: another DP size, TP or PP degree, ZeRO stage.

DeepSpeed's checkpoint files only load into the layout that wrote them. When the layout changed,
the checkpoint is converted once into a layout-free form, kept next to it:

    checkpoints/step_<N>/universal/
        param.pt  exp_avg.pt  exp_avg_sq.pt   name -> full fp32 tensor (our model's names)
        universal.json                         Adam's step count, the source layout, sha256 per file

Rank 0 of the new world writes it (into a temporary directory renamed into place, so it exists
whole or not at all; a later resume on yet another layout reuses it); where every node holds its
own copy of the step (`Store.copy_per_node`: object storage), the first rank of each node does.
Every rank then reads only the tensors it holds, memory-mapped and without unpickling
(`weights_only`), slices its TP shard, and sets them in its engine: fp32 master weights and both
Adam moments through DeepSpeed's `safe_set_full_*` API under ZeRO 1-3 (and the bf16 optimizer),
the parameters and the torch optimizer's state directly under fp32 ZeRO-0. The optimizer state is created in full first, with
the checkpoint's step count, so the first step after the resume is the step the old layout would
have taken: same weights, same moments, same bias correction, same global batch.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from trainer import library_internals
from trainer.checkpoint.deepspeed_format import (
    consolidate,
    model_param_name,
    optimizer_step_count,
    tp_split_dim,
)
from trainer.checkpoint.manager import CheckpointError, Committed
from trainer.config import ModelConfig
from trainer.fsutil import sha256_file

log = logging.getLogger("pretrain")

DIR = "universal"
RECORD = "universal.json"
KINDS = ("param", "exp_avg", "exp_avg_sq")
LAYOUT = ("dp", "tp", "pp", "zero_stage")  # what DeepSpeed's files depend on (not the micro batch)


def layout_key(layout: dict) -> tuple[int, ...]:
    return tuple(int(layout.get(k, 0)) for k in LAYOUT)


def describe(layout: dict) -> str:
    dp, tp, pp, zero = layout_key(layout)
    return f"dp{dp} tp{tp} pp{pp} ZeRO-{zero}"


def convert(found: Committed, model_cfg: ModelConfig) -> Path:
    """The checkpoint's layout-free form, written now unless it already exists and checks out."""
    out = found.path / DIR
    if _check(out) is None:
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIR}-", dir=found.path))
    try:
        files = {}
        for kind in KINDS:
            # One kind at a time: the whole model is in memory once, not three times.
            sd = consolidate(found.path, found.record, model_cfg, None if kind == "param" else kind)
            sd = {name: t.contiguous().float() for name, t in sd.items()}
            if model_cfg.tie_embeddings:
                sd.pop("head.out.weight", None)  # the same tensor as embed.tok.weight
            torch.save(sd, tmp / f"{kind}.pt")
            del sd
            files[f"{kind}.pt"] = sha256_file(tmp / f"{kind}.pt")
        record = {
            "step": found.step,
            "adam_step": optimizer_step_count(found.path, found.record),
            "source_layout": found.record.get("layout"),
            "files": files,
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
        shutil.rmtree(out, ignore_errors=True)  # a stale or damaged earlier conversion
        try:
            tmp.rename(out)
        except OSError:  # another node's converter (same shared directory) was first
            if _check(out) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except CheckpointError as e:  # DeepSpeed's files cannot be read as their layout says
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot convert {found.path} to the new layout: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check(path: Path) -> str | None:
    """None when `path` holds a complete conversion whose files match their sha256; else why not."""
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return f"{path / RECORD} is missing or unreadable"
    for name, digest in record.get("files", {}).items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            return f"{path / name} does not match its sha256 in {RECORD}"
    return None if set(record.get("files", {})) == {f"{k}.pt" for k in KINDS} else f"{path} is incomplete"


def load(engine, universal: Path, model_cfg: ModelConfig, tp: int, tp_rank: int, pp: int) -> int:
    """Set this rank's share of a converted checkpoint into `engine`; Adam's step count."""
    problem = _check(universal)
    if problem:
        raise CheckpointError(f"cannot resume from the converted checkpoint: {problem}")
    record = json.loads((universal / RECORD).read_text())
    adam_step = int(record["adam_step"])
    # Memory-mapped, plain tensors only: each rank pages in just the slices it uses.
    full = {
        k: torch.load(universal / f"{k}.pt", map_location="cpu", mmap=True, weights_only=True) for k in KINDS
    }
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    _create_optimizer_state(engine, adam_step)

    def shard(kind: str, name: str, shape) -> torch.Tensor:
        key = model_param_name(name, pp, model_cfg.n_layers)
        if model_cfg.tie_embeddings and key == "head.out.weight":
            key = "embed.tok.weight"
        if key not in full[kind]:
            raise CheckpointError(f"{universal / (kind + '.pt')} has no tensor {key} (parameter {name})")
        t = full[kind][key]
        dim = tp_split_dim(key) if tp > 1 else None
        if dim is not None:
            t = t.chunk(tp, dim=dim)[tp_rank]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{universal}: {key} has shape {tuple(t.shape)} for parameter {name}, which needs {tuple(shape)}"
            )
        return t

    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero3 = [p for _, p in params if hasattr(p, "ds_id")]
    for name, p in params:
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
        value = shard("param", name, shape)
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO 1-3, bf16 optimizer: fp32 masters
            safe_set_full_fp32_param(p, value.to(p.device))
            for kind in KINDS[1:]:
                safe_set_full_optimizer_state(p, shard(kind, name, shape).to(p.device), kind)
            if not hasattr(p, "ds_id"):  # every DP rank holds the whole low-precision copy
                with torch.no_grad():
                    p.copy_(value.to(p.dtype))
        else:  # fp32 ZeRO-0: the parameter is the master; the torch optimizer's state is per parameter
            with torch.no_grad():
                p.copy_(value)
            state = engine.optimizer.state[p]
            for kind in KINDS[1:]:
                state[kind].copy_(shard(kind, name, shape))
    if zero3:  # the working (low-precision) partitions follow the fp32 masters
        opt = engine.optimizer
        with torch.no_grad():
            for lp, hp in zip(
                opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat, strict=True
            ):
                if lp is not None:
                    lp.copy_(hp)
    return adam_step


def _create_optimizer_state(engine, step: int) -> None:
    """Adam's state as its first step creates it (zeros and a step counter), created now so that
    the converted moments can be set into it; ZeRO 1/2 then link their per-parameter views."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)  # ZeRO / bf16 wrappers hold the torch optimizer
    fused = base.defaults.get("fused") or base.defaults.get("capturable")
    # ZeRO-3 adds its flat fp32 partitions to the torch optimizer's groups only during a step.
    flat = getattr(opt, "fp32_partitioned_groups_flat", None)
    for p in flat if flat is not None else [p for group in base.param_groups for p in group["params"]]:
        base.state[p] = {
            "step": torch.tensor(float(step), dtype=torch.float32, device=p.device if fused else "cpu"),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    library_internals.link_hp_optimizer_state(opt)
