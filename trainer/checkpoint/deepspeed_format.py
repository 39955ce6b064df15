"""DeepSpeed's checkpoint format, read back: one fp32 state dict with our model's names from a
verified checkpoint of any layout (used by the layout-free conversion, `reshard.py`, and by the
Hugging Face export, `trainer/export.py`).

Per DeepSpeed model-parallel rank m (= pp_rank * tp + tp_rank, the same formula as our
`ModelParallelUnit`):
  * ZeRO-1/2/3: the fp32 master weights from the DP ranks' `*_optim_states.pt` partitions, through
    DeepSpeed's own `zero_to_fp32` reconstruction (its per-file helpers: its top-level function
    globs every mp rank's files together, which is wrong under TP/PP); Adam's moments the same way,
    as DeepSpeed partitions them exactly like the master weights;
  * ZeRO-0: the module weights of `mp_rank_XX_model_states.pt` (the engine's parameters: fp32 unless
    the run trained in bf16 without ZeRO);
  * pipeline stages name parameters `<layer index>.<stage module>...`; layer 0 is the embedding,
    1..L the blocks, L+1 the head (`trainer/parallel/pipeline.py`). With ZeRO-0 the weights live in
    `layer_XX-model_YY-model_states.pt`.
Then the TP shards are concatenated along the dims of `TP_PLAN` (colwise and vocab: dim 0, rowwise:
dim 1 of the weight, its bias replicated) and tied embeddings re-tied.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import torch

from trainer import library_internals
from trainer.checkpoint.manager import CheckpointError
from trainer.checkpoint.store import COMMIT
from trainer.config import ModelConfig
from trainer.parallel.tensor import TP_PLAN


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class _Listed:
    """The files of a verified checkpoint that its commit record lists: the only ones ever read
    here (a file beside them, matching a pattern or not, is never opened, let alone unpickled)."""

    def __init__(self, ckpt_dir: Path, record: dict):
        self.dir = ckpt_dir
        self.names = frozenset(record.get("files") or ())

    def glob(self, pattern: str) -> list[Path]:
        return [self.dir / n for n in sorted(fnmatch.filter(self.names, pattern), key=_natural)]

    def file(self, name: str, what: str) -> Path:
        if name not in self.names:
            raise CheckpointError(f"{self.dir / name} ({what}) is not in the checkpoint's {COMMIT}")
        return self.dir / name


def _torch_load(path: Path):
    # DeepSpeed's files are pickles (weights_only=False runs code from the file). Only ever called
    # after CheckpointManager verified the file against the sha256 in the run's commit record.
    return torch.load(path, map_location="cpu", weights_only=False)


def _layout(record: dict, ckpt_dir: Path) -> tuple[int, int, int]:
    layout = record.get("layout")
    if not isinstance(layout, dict):
        raise CheckpointError(
            f"{ckpt_dir / COMMIT} records no layout (tp, pp, zero_stage); cannot consolidate"
        )
    return int(layout.get("tp", 1)), int(layout.get("pp", 1)), int(layout.get("zero_stage", 0))


def _zero_master_weights(
    ckpt: _Listed, mp: int, zero_stage: int, key: str | None = None
) -> dict[str, torch.Tensor]:
    """fp32 master weights of model-parallel rank `mp`, from its DP ranks' optimizer partitions,
    through DeepSpeed's own zero_to_fp32 reconstruction. With `key` ("exp_avg", "exp_avg_sq"):
    that optimizer state instead, which DeepSpeed partitions exactly like the master weights."""
    from deepspeed.utils import zero_to_fp32 as z

    ckpt_dir = ckpt.dir
    optim = ckpt.glob(f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt")
    if zero_stage == 3:
        model = ckpt.glob(f"zero_pp_rank_*_mp_rank_{mp:02d}_model_states.pt")
    else:
        model = ckpt.glob(f"mp_rank_{mp:02d}_model_states.pt")
    if not optim or not model:
        raise CheckpointError(
            f"{ckpt_dir}: no ZeRO-{zero_stage} files for model-parallel rank {mp} "
            f"(*_mp_rank_{mp:02d}_optim_states.pt / model_states.pt)"
        )
    # A change to zero_to_fp32's private helpers fails loudly here, naming the DeepSpeed version.
    try:
        with library_internals.quiet():
            states = [_model_state(z, p) for p in model]
            stage, world, flat, paddings = z.parse_optim_states([str(p) for p in optim], str(ckpt_dir))
            if key is not None:
                flat = [_flat_optimizer_state(p, key) for p in optim]
            sd = library_internals.fp32_state_dict_from_zero(z, stage, world, flat, states, paddings)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        import deepspeed

        raise CheckpointError(
            f"{ckpt_dir}: DeepSpeed {deepspeed.__version__} could not reconstruct the fp32 "
            f"{key or 'weights'} of model-parallel rank {mp}: {e}"
        ) from None
    return sd  # ZeRO-3: lazy GatheredTensors, materialised one by one by .contiguous()


def _flat_states(path: Path) -> list[dict]:
    """One DP rank's torch-optimizer states from a ZeRO `*_optim_states.pt`, one per flat group, in
    the order of its fp32 flat groups (the base optimizer holds exactly one flat tensor per group)."""
    osd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
    base = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")  # ZeRO-1/2 | ZeRO-3
    if isinstance(base, list):  # ZeRO-1/2 "elastic" form: one state dict per group
        return base
    return [base["state"][i] for i in sorted(base["state"])]


def _flat_optimizer_state(path: Path, key: str) -> list[torch.Tensor]:
    """One DP rank's flat partitions of optimizer state `key` ("exp_avg", ...), one per group."""
    return [group[key] for group in _flat_states(path)]


def optimizer_step_count(ckpt_dir: Path, record: dict) -> int:
    """Adam's step counter in a checkpoint (bias correction depends on it)."""
    _, _, zero_stage = _layout(record, ckpt_dir)
    ckpt = _Listed(ckpt_dir, record)
    if zero_stage >= 1:
        optim = ckpt.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")
        if not optim:
            raise CheckpointError(f"{ckpt_dir}: no *_mp_rank_00_optim_states.pt in its {COMMIT}")
        states = _flat_states(optim[0])
    else:
        model = ckpt.file("mp_rank_00_model_states.pt", "ZeRO-0 model states")
        opt = _torch_load(model).get("optimizer") or {}
        states = list(opt.get("state", {}).values())
    steps = {int(s["step"]) for s in states if "step" in s}
    if len(steps) != 1:
        raise CheckpointError(f"{ckpt_dir}: cannot tell the optimizer's step count (found {sorted(steps)})")
    return steps.pop()


def _stage_optimizer_state(ckpt: _Listed, mp: int, key: str) -> dict[str, torch.Tensor]:
    """ZeRO-0 without PP: optimizer state `key` of the engine's torch optimizer, by parameter name.
    The optimizer's parameter order is `trainer.engine.param_groups` over the module's parameters
    (matrices first, then vectors, each in module order); a tied weight is one parameter."""
    path = ckpt.file(f"mp_rank_{mp:02d}_model_states.pt", f"ZeRO-0 states of model-parallel rank {mp}")
    sd = _torch_load(path)
    module, opt = sd["module"], sd.get("optimizer") or {}
    names, seen = [], set()
    for name, t in module.items():
        if name in sd.get("buffer_names", []) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        names.append(name)
    order = [n for n in names if module[n].dim() >= 2] + [n for n in names if module[n].dim() < 2]
    ids = [i for group in opt.get("param_groups", []) for i in group["params"]]
    if len(ids) != len(order) or any(key not in opt["state"].get(i, {}) for i in ids):
        raise CheckpointError(
            f"{path}: its optimizer state does not match its {len(order)} parameters; cannot convert it"
        )
    return {name: opt["state"][i][key] for name, i in zip(order, ids, strict=True)}


def _model_state(z, path: Path):
    """zero_to_fp32's `parse_model_states` for one file, also for a pipeline stage's file, whose
    `module` is None (its weights are in the layer files; its fp32 masters in the optimizer's)."""
    sd = _torch_load(path)
    module = sd.get("module") or {}
    buffers = {
        k: v.float() if v.is_floating_point() else v for k, v in module.items() if k in sd["buffer_names"]
    }
    return z.zero_model_state(
        buffers=buffers,
        param_shapes=sd["param_shapes"],
        shared_params=list(sd.get("shared_params", {}).items()),
        ds_version=sd.get("ds_version"),
        frozen_param_shapes=sd.get("frozen_param_shapes"),
        frozen_param_fragments=sd.get("frozen_param_fragments"),
    )


def _stage_weights(ckpt: _Listed, mp: int) -> dict[str, torch.Tensor]:
    """ZeRO-0 without PP: the engine's own parameters of model-parallel rank `mp`."""
    path = ckpt.file(f"mp_rank_{mp:02d}_model_states.pt", f"ZeRO-0 model states of model-parallel rank {mp}")
    return dict(_torch_load(path)["module"])


def _layer_weights(ckpt: _Listed, tp_rank: int) -> dict[str, torch.Tensor]:
    """ZeRO-0 under PP: the stage files hold no weights; every layer has its own file per TP rank.
    Names as the PipelineModule's: `<layer idx>.<key>`."""
    layers = ckpt.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")
    if not layers:
        raise CheckpointError(f"{ckpt.dir}: no layer_XX-model_{tp_rank:02d}-model_states.pt pipeline files")
    out: dict[str, torch.Tensor] = {}
    for path in layers:
        idx = int(path.name.split("-")[0].removeprefix("layer_"))
        out.update({f"{idx}.{k}": v for k, v in _torch_load(path).items()})
    return out


def model_param_name(name: str, pp: int, n_layers: int) -> str:
    """An engine parameter name -> our model's. Under PP a PipelineModule names it
    `<layer idx>.<stage module path>`: layer 0 is the embedding, 1..L the blocks, L+1 the head."""
    if pp == 1:
        return name
    idx, _, rest = name.partition(".")
    i = int(idx)
    if i == 0 or i == n_layers + 1:  # ModuleStage's `embed` / `head`: already our names
        return rest
    return f"blocks.{i - 1}.{rest.removeprefix('block.')}"


def tp_split_dim(name: str) -> int | None:
    """The dim along which TP splits parameter `name` (None: replicated)."""
    module, _, kind = name.rpartition(".")
    style = next((s for pattern, s in TP_PLAN.items() if fnmatch.fnmatchcase(module, pattern)), None)
    if style in ("vocab", "colwise", "vocab_colwise"):
        return 0
    if style == "rowwise":
        return 1 if kind == "weight" else None  # the rowwise bias is added once, after the sum
    return None


def consolidate(
    ckpt_dir: Path, record: dict, model_cfg: ModelConfig, key: str | None = None
) -> dict[str, torch.Tensor]:
    """One fp32 state dict with our model's names from a verified checkpoint of any layout; with
    `key` ("exp_avg", "exp_avg_sq") the optimizer's state for each parameter instead. Reads only
    the files `record` (its verified commit record) lists."""
    tp, pp, zero_stage = _layout(record, ckpt_dir)
    ckpt = _Listed(ckpt_dir, record)
    if key is not None and zero_stage == 0 and (pp > 1 or ckpt.glob("*optim_states.pt")):
        raise CheckpointError(
            f"{ckpt_dir}: converting the optimizer state of a ZeRO-0 {'pipeline' if pp > 1 else 'bf16'} "
            "checkpoint is not supported; resume it with its own layout, or train with zero_stage >= 1"
        )
    if pp > 1 and not ckpt.glob("layer_*-model_states.pt"):
        raise CheckpointError(
            f"{ckpt_dir}: layout pp={pp} but no layer_XX-model_states.pt pipeline files; "
            "this checkpoint cannot be consolidated"
        )
    per_tp: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for mp in range(tp * pp):
        stage, tp_rank = divmod(mp, tp)
        if zero_stage >= 1:
            part = _zero_master_weights(ckpt, mp, zero_stage, key)
        elif pp == 1:
            part = _stage_weights(ckpt, mp) if key is None else _stage_optimizer_state(ckpt, mp, key)
        elif stage == 0:
            part = _layer_weights(ckpt, tp_rank)  # every stage's layers of this TP rank
        else:
            continue
        part = {model_param_name(k, pp, model_cfg.n_layers): v for k, v in part.items()}
        if model_cfg.tie_embeddings:  # DeepSpeed records the tie on some mp ranks only: re-tied below
            part.pop("head.out.weight", None)
        per_tp[tp_rank].update(part)

    sd: dict[str, torch.Tensor] = {}
    for name in list(per_tp[0]):
        try:
            shards = [part.pop(name) for part in per_tp]  # drop references as we go
        except KeyError:
            raise CheckpointError(
                f"{ckpt_dir}: {name} is missing from some tensor-parallel rank's files"
            ) from None
        dim = tp_split_dim(name) if tp > 1 else None
        if dim is None:
            sd[name] = shards[0].contiguous().float()
        else:
            sd[name] = torch.cat([s.contiguous().float() for s in shards], dim=dim)
    if model_cfg.tie_embeddings and "embed.tok.weight" in sd:
        sd["head.out.weight"] = sd["embed.tok.weight"]  # one tensor; DeepSpeed stored it once
    return sd
