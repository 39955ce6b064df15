"""A committed checkpoint of any layout -> one Hugging Face model directory, verified.

    export_run(run_dir, out_dir) -> <out_dir>/
        config.json                       LlamaForCausalLM (arch llama) or GPT2LMHeadModel (arch gpt2)
        generation_config.json            bos/eos = <|endoftext|>
        model.safetensors                 or model-0000k-of-0000n.safetensors + model.safetensors.index.json
        tokenizer.json                    the corpus tokenizer, byte for byte
        tokenizer_config.json, special_tokens_map.json   <|endoftext|> as bos/eos/unk

Order of work: pick the committed step (newest, or the one asked for) -> verify every file it lists
against the sha256 in its commit record (CheckpointManager's verification) -> only then unpickle
DeepSpeed's files -> consolidate to one fp32 state dict with our model's names -> rename/permute to
HF's names, written shard by shard -> load the directory with `transformers` and compare its logits
with our `Transformer` on fixed prompts. Output is written to a temporary sibling of `out_dir` that is
renamed into place only when the check passes: a failed export leaves nothing at `out_dir`.

Consolidation (`load_weights`), per DeepSpeed model-parallel rank m (= pp_rank * tp + tp_rank, the
same formula as our `ModelParallelUnit`):
  * ZeRO-1/2/3: the fp32 master weights from the DP ranks' `*_optim_states.pt` partitions, through
    DeepSpeed's own `zero_to_fp32` reconstruction (its per-file helpers: its top-level function
    globs every mp rank's files together, which is wrong under TP/PP);
  * ZeRO-0: the module weights of `mp_rank_XX_model_states.pt` (the engine's parameters: fp32 unless
    the run trained in bf16 without ZeRO);
  * pipeline stages name parameters `<layer index>.<stage module>...`; layer 0 is the embedding,
    1..L the blocks, L+1 the head (`trainer/parallel/pipeline.py`). With ZeRO-0 the weights live in
    `layer_XX-model_YY-model_states.pt`.
Then the TP shards are concatenated along the dims of `TP_PLAN` (colwise and vocab: dim 0, rowwise:
dim 1 of the weight, its bias replicated) and tied embeddings re-tied.

RoPE: our model rotates interleaved pairs (x[2i], x[2i+1]); HF Llama rotates halves (x[i],
x[i + Dh/2]). The rows of wq and wk are permuted per head on export (HF's
`convert_llama_weights_to_hf.py` `permute`), so both compute the same function.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from trainer.checkpoint import COMMIT, CheckpointError, CheckpointManager, Committed
from trainer.config import Config, ModelConfig, from_dict, load_yaml
from trainer.data.storage import is_remote
from trainer.parallel.tensor import TP_PLAN

log = logging.getLogger("pretrain")

EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_SHARD_SIZE = "5GB"
FP32_TOL = 1e-4


class ExportError(RuntimeError):
    """The export cannot be done or did not check out; the message says why and what to change."""


# ---------------------------------------------------------------------------------- the run


@dataclass
class RunWeights:
    """A committed checkpoint's weights, consolidated: fp32, our model's parameter names."""

    cfg: Config  # the run's config, model.vocab_size resolved from the weights
    found: Committed
    state_dict: dict[str, torch.Tensor]


def run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{path} does not exist: {run_dir} is not a run directory")
    return from_dict(load_yaml(path))


def find_checkpoint(run_dir: Path, cfg: Config, step: int | None = None) -> Committed:
    """The committed checkpoint to read (newest, or `step`), its files checked against the sha256
    of its commit record. A checkpoint that fails the check is refused (not skipped for an older
    one): the message names the bad files and the other committed steps."""
    manager = CheckpointManager(run_dir, cfg.checkpoint, rank=0, world_size=1)
    if manager.remote is not None:  # object storage: the manager downloads and verifies the newest
        found = manager.latest()
        if found is None:
            raise ExportError(f"no committed checkpoint that checks out in {cfg.checkpoint.storage}")
        if step is not None and found.step != step:
            raise ExportError(
                f"step {step} is not the newest committed checkpoint in {cfg.checkpoint.storage} "
                f"(that is step {found.step}); only the newest can be exported from object storage"
            )
        return found
    committed = {}
    for s, path in manager._step_dirs():
        if (path / COMMIT).is_file():
            committed[s] = path
    if not committed:
        raise ExportError(f"{manager.root} holds no committed checkpoint (no step_N/{COMMIT})")
    if step is None:
        step = max(committed)
    elif step not in committed:
        raise ExportError(
            f"no committed checkpoint for step {step} in {manager.root}; committed steps: "
            f"{', '.join(map(str, sorted(committed)))}"
        )
    path = committed[step]
    try:
        record = json.loads((path / COMMIT).read_text())
        if not isinstance(record.get("files"), dict):
            raise ValueError("no files table")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / COMMIT} is not a readable commit record ({e})") from None
    problems = manager._problems(path, record)  # sizes + sha256 of every listed file
    if problems:
        others = sorted(s for s in committed if s != step)
        hint = f"; other committed steps: {', '.join(map(str, others))} (--step N)" if others else ""
        raise CheckpointError(f"refusing checkpoint step {step}: {'; '.join(problems)}{hint}")
    return Committed(step, path, record)


def load_weights(run_dir: str | Path, step: int | None = None) -> RunWeights:
    """The verified, consolidated weights of a run's committed checkpoint (newest, or `step`)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    found = find_checkpoint(run_dir, cfg, step)
    sd = consolidate(found.path, found.record, cfg.model)
    vocab = sd["embed.tok.weight"].shape[0]
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
    from trainer.loop import RESUME_INVARIANT

    want = found.record.get("config_fingerprint")
    if want and want != cfg.fingerprint(RESUME_INVARIANT):
        raise ExportError(
            f"{run_dir / 'config.yaml'}: its model section is not the one checkpoint {found.path} was "
            "trained with (config fingerprint differs); restore the run's own config.yaml"
        )
    _check_names(sd, cfg.model, found.path)
    return RunWeights(cfg, found, sd)


# ---------------------------------------------------------------------------------- consolidation


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _files(ckpt_dir: Path, pattern: str) -> list[Path]:
    return sorted(ckpt_dir.glob(pattern), key=lambda p: _natural(p.name))


def _torch_load(path: Path):
    # DeepSpeed's files are pickles (weights_only=False runs code from the file). Only ever called
    # after find_checkpoint verified the file against the sha256 in the run's commit record.
    return torch.load(path, map_location="cpu", weights_only=False)


def _layout(record: dict, ckpt_dir: Path) -> tuple[int, int, int]:
    layout = record.get("layout")
    if not isinstance(layout, dict):
        raise ExportError(f"{ckpt_dir / COMMIT} records no layout (tp, pp, zero_stage); cannot consolidate")
    return int(layout.get("tp", 1)), int(layout.get("pp", 1)), int(layout.get("zero_stage", 0))


@contextlib.contextmanager
def _quiet(z):
    """zero_to_fp32 prints, and draws a progress bar for every step of a load: silence both."""
    bar = z.tqdm
    z.tqdm = lambda it, *a, **kw: it
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        z.tqdm = bar


def _zero_master_weights(
    ckpt_dir: Path, mp: int, zero_stage: int, key: str | None = None
) -> dict[str, torch.Tensor]:
    """fp32 master weights of model-parallel rank `mp`, from its DP ranks' optimizer partitions,
    through DeepSpeed's own zero_to_fp32 reconstruction. With `key` ("exp_avg", "exp_avg_sq"):
    that optimizer state instead, which DeepSpeed partitions exactly like the master weights."""
    from deepspeed.utils import zero_to_fp32 as z

    optim = _files(ckpt_dir, f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt")
    if zero_stage == 3:
        model = _files(ckpt_dir, f"zero_pp_rank_*_mp_rank_{mp:02d}_model_states.pt")
    else:
        model = _files(ckpt_dir, f"mp_rank_{mp:02d}_model_states.pt")
    if not optim or not model:
        raise ExportError(
            f"{ckpt_dir}: no ZeRO-{zero_stage} files for model-parallel rank {mp} "
            f"(*_mp_rank_{mp:02d}_optim_states.pt / model_states.pt)"
        )
    try:
        with _quiet(z):
            states = [_model_state(z, p) for p in model]
            stage, world, flat, paddings = z.parse_optim_states([str(p) for p in optim], str(ckpt_dir))
            if key is not None:
                flat = [_flat_optimizer_state(p, key) for p in optim]
            if stage <= 2:
                sd = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat, states, False, paddings)
            else:
                sd = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat, states, False)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        import deepspeed

        raise ExportError(
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
    if zero_stage >= 1:
        states = _flat_states(_files(ckpt_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")[0])
    else:
        opt = _torch_load(ckpt_dir / "mp_rank_00_model_states.pt").get("optimizer") or {}
        states = list(opt.get("state", {}).values())
    steps = {int(s["step"]) for s in states if "step" in s}
    if len(steps) != 1:
        raise ExportError(f"{ckpt_dir}: cannot tell the optimizer's step count (found {sorted(steps)})")
    return steps.pop()


def _stage_optimizer_state(ckpt_dir: Path, mp: int, key: str) -> dict[str, torch.Tensor]:
    """ZeRO-0 without PP: optimizer state `key` of the engine's torch optimizer, by parameter name.
    The optimizer's parameter order is `trainer.engine.param_groups` over the module's parameters
    (matrices first, then vectors, each in module order); a tied weight is one parameter."""
    sd = _torch_load(ckpt_dir / f"mp_rank_{mp:02d}_model_states.pt")
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
        raise ExportError(
            f"{ckpt_dir / f'mp_rank_{mp:02d}_model_states.pt'}: its optimizer state does not match its "
            f"{len(order)} parameters; cannot convert it"
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


def _stage_weights(ckpt_dir: Path, mp: int) -> dict[str, torch.Tensor]:
    """ZeRO-0 without PP: the engine's own parameters of model-parallel rank `mp`."""
    path = ckpt_dir / f"mp_rank_{mp:02d}_model_states.pt"
    if not path.is_file():
        raise ExportError(f"{path} is missing (ZeRO-0 model states of model-parallel rank {mp})")
    return dict(_torch_load(path)["module"])


def _layer_weights(ckpt_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """ZeRO-0 under PP: the stage files hold no weights; every layer has its own file per TP rank.
    Names as the PipelineModule's: `<layer idx>.<key>`."""
    layers = _files(ckpt_dir, f"layer_*-model_{tp_rank:02d}-model_states.pt")
    if not layers:
        raise ExportError(f"{ckpt_dir}: no layer_XX-model_{tp_rank:02d}-model_states.pt pipeline files")
    out: dict[str, torch.Tensor] = {}
    for path in layers:
        idx = int(path.name.split("-")[0].removeprefix("layer_"))
        out.update({f"{idx}.{k}": v for k, v in _torch_load(path).items()})
    return out


def _from_pipeline_name(name: str, n_layers: int) -> str:
    """`<layer idx>.<stage module path>` (PipelineModule) -> our model's name."""
    idx, _, rest = name.partition(".")
    i = int(idx)
    if i == 0 or i == n_layers + 1:  # EmbedStage.embed / HeadStage.head: already our names
        return rest
    return f"blocks.{i - 1}.{rest.removeprefix('block.')}"


def _tp_dims(name: str) -> int | None:
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
    `key` ("exp_avg", "exp_avg_sq") the optimizer's state for each parameter instead."""
    tp, pp, zero_stage = _layout(record, ckpt_dir)
    if key is not None and zero_stage == 0 and (pp > 1 or _files(ckpt_dir, "*optim_states.pt")):
        raise ExportError(
            f"{ckpt_dir}: converting the optimizer state of a ZeRO-0 {'pipeline' if pp > 1 else 'bf16'} "
            "checkpoint is not supported; resume it with its own layout, or train with zero_stage >= 1"
        )
    if pp > 1 and not _files(ckpt_dir, "layer_*-model_states.pt"):
        raise ExportError(
            f"{ckpt_dir}: layout pp={pp} but no layer_XX-model_states.pt pipeline files; "
            "this checkpoint cannot be consolidated"
        )
    per_tp: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for mp in range(tp * pp):
        stage, tp_rank = divmod(mp, tp)
        if zero_stage >= 1:
            part = _zero_master_weights(ckpt_dir, mp, zero_stage, key)
        elif pp == 1:
            part = _stage_weights(ckpt_dir, mp) if key is None else _stage_optimizer_state(ckpt_dir, mp, key)
        elif stage == 0:
            part = _layer_weights(ckpt_dir, tp_rank)  # every stage's layers of this TP rank
        else:
            continue
        if pp > 1:
            part = {_from_pipeline_name(k, model_cfg.n_layers): v for k, v in part.items()}
        if model_cfg.tie_embeddings:  # DeepSpeed records the tie on some mp ranks only: re-tied below
            part.pop("head.out.weight", None)
        per_tp[tp_rank].update(part)

    sd: dict[str, torch.Tensor] = {}
    for name in list(per_tp[0]):
        try:
            shards = [part.pop(name) for part in per_tp]  # drop references as we go
        except KeyError:
            raise ExportError(
                f"{ckpt_dir}: {name} is missing from some tensor-parallel rank's files"
            ) from None
        dim = _tp_dims(name) if tp > 1 else None
        if dim is None:
            sd[name] = shards[0].contiguous().float()
        else:
            sd[name] = torch.cat([s.contiguous().float() for s in shards], dim=dim)
    if model_cfg.tie_embeddings and "embed.tok.weight" in sd:
        sd["head.out.weight"] = sd["embed.tok.weight"]  # one tensor; DeepSpeed stored it once
    return sd


def _check_names(sd: dict, model_cfg: ModelConfig, where: Path) -> None:
    from trainer.model import Transformer

    with torch.device("meta"):
        want = set(Transformer(model_cfg).state_dict())
    missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or extra:
        raise ExportError(
            f"{where}: the consolidated weights do not fit the run's model config "
            f"(missing: {missing[:5]}, unexpected: {extra[:5]})"
        )


def build_model(model_cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    """Our Transformer holding `sd` (assigned, not copied), in eval mode."""
    from trainer.model import Transformer

    model = Transformer(model_cfg)
    model.load_state_dict(sd, assign=True)
    if model_cfg.tie_embeddings:
        model.head.out.weight = model.embed.tok.weight
    return model.eval()


# ---------------------------------------------------------------------------------- HF layout


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved RoPE pairs to HF's rotate_half halves, per head:
    new row a*Dh/2 + i = old row 2i + a."""
    out_dim, d = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, d).transpose(1, 2).reshape(out_dim, d)


Producer = tuple[str, list[str], Callable[[], torch.Tensor]]  # HF name, our source names, make


def hf_tensors(m: ModelConfig, sd: dict[str, torch.Tensor]) -> list[Producer]:
    """HF's tensors for our state dict, each made on demand (so shards can be written one by one)."""
    out: list[Producer] = []

    def add(hf: str, src: str | list[str], fn=lambda t: t) -> None:
        names = [src] if isinstance(src, str) else src
        out.append((hf, names, lambda: fn(*(sd[n] for n in names))))

    def t(x):  # nn.Linear (out, in) -> Conv1D (in, out)
        return x.t()

    if m.arch == "llama":
        add("model.embed_tokens.weight", "embed.tok.weight")
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            add(h + "input_layernorm.weight", b + "attn_norm.weight")
            add(h + "self_attn.q_proj.weight", b + "attn.wq.weight", lambda w: _permute_rotary(w, m.n_heads))
            add(h + "self_attn.k_proj.weight", b + "attn.wk.weight", lambda w: _permute_rotary(w, m.kv_heads))
            add(h + "self_attn.v_proj.weight", b + "attn.wv.weight")
            add(h + "self_attn.o_proj.weight", b + "attn.wo.weight")
            add(h + "post_attention_layernorm.weight", b + "mlp_norm.weight")
            add(h + "mlp.gate_proj.weight", b + "mlp.w1.weight")
            add(h + "mlp.up_proj.weight", b + "mlp.w3.weight")
            add(h + "mlp.down_proj.weight", b + "mlp.w2.weight")
        add("model.norm.weight", "head.norm.weight")
    else:
        add("transformer.wte.weight", "embed.tok.weight")
        add("transformer.wpe.weight", "embed.pos.weight")
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            add(h + "ln_1.weight", b + "attn_norm.weight")
            add(h + "ln_1.bias", b + "attn_norm.bias")
            qkv = [b + f"attn.{w}.weight" for w in ("wq", "wk", "wv")]
            add(h + "attn.c_attn.weight", qkv, lambda q, k, v: torch.cat([q, k, v], 0).t())
            add(h + "attn.c_attn.bias", [n.replace("weight", "bias") for n in qkv], lambda *x: torch.cat(x))
            add(h + "attn.c_proj.weight", b + "attn.wo.weight", t)
            add(h + "attn.c_proj.bias", b + "attn.wo.bias")
            add(h + "ln_2.weight", b + "mlp_norm.weight")
            add(h + "ln_2.bias", b + "mlp_norm.bias")
            add(h + "mlp.c_fc.weight", b + "mlp.w1.weight", t)
            add(h + "mlp.c_fc.bias", b + "mlp.w1.bias")
            add(h + "mlp.c_proj.weight", b + "mlp.w2.weight", t)
            add(h + "mlp.c_proj.bias", b + "mlp.w2.bias")
        add("transformer.ln_f.weight", "head.norm.weight")
        add("transformer.ln_f.bias", "head.norm.bias")
    if not m.tie_embeddings:
        add("lm_head.weight", "head.out.weight")
    return out


def _dtype_key() -> str:
    """transformers >= 4.56 calls the config's and from_pretrained's dtype `dtype`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def hf_config(m: ModelConfig, dtype: str, eos_id: int):
    """The transformers config object of our model config."""
    import transformers

    common = {
        "vocab_size": m.vocab_size,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": m.tie_embeddings,
        _dtype_key(): "bfloat16" if dtype == "bf16" else "float32",
    }
    if m.arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=m.d_model,
            intermediate_size=m.ff_dim,
            num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads,
            num_key_value_heads=m.kv_heads,
            head_dim=m.head_dim,
            max_position_embeddings=m.max_seq_len,
            rms_norm_eps=m.norm_eps,
            rope_theta=m.rope_theta,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            architectures=["LlamaForCausalLM"],
            **common,
        )
    return transformers.GPT2Config(
        n_positions=m.max_seq_len,
        n_embd=m.d_model,
        n_layer=m.n_layers,
        n_head=m.n_heads,
        n_inner=m.ff_dim,
        activation_function="gelu_new",  # GELU, tanh approximation
        layer_norm_epsilon=m.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        architectures=["GPT2LMHeadModel"],
        **common,
    )


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """'5GB' (decimal, as HF), '500MiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ExportError(f"--max-shard-size {size!r}: give a size like 5GB, 500MB, 200MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _shards(tensors: list[Producer], sd: dict, itemsize: int, max_bytes: int) -> list[list[Producer]]:
    """Group the tensors in order into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[Producer]] = [[]]
    size = 0
    for p in tensors:
        nbytes = sum(sd[n].numel() for n in p[1]) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes
    return shards


def write_weights(out: Path, m: ModelConfig, sd: dict, dtype: torch.dtype, max_bytes: int) -> list[str]:
    """model.safetensors, or shards + index, written one shard at a time. The file names written."""
    from safetensors.torch import save_file

    tensors = hf_tensors(m, sd)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(tensors, sd, itemsize, max_bytes)
    n = len(shards)
    weight_map, total, names = {}, 0, []
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        block = {hf: make().to(dtype).contiguous() for hf, _, make in shard}  # this shard only
        save_file(block, str(out / fname), metadata={"format": "pt"})
        for hf, t in block.items():
            weight_map[hf] = fname
            total += t.numel() * t.element_size()
        names.append(fname)
        del block
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        names.append("model.safetensors.index.json")
    return names


def tokenizer_path(cfg: Config) -> Path | None:
    """The corpus's tokenizer.json when the corpus is on a local path."""
    if not cfg.data.path or is_remote(cfg.data.path):
        return None
    root = Path(cfg.data.path)
    name = "tokenizer.json"
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            name = json.loads(manifest.read_text()).get("tokenizer_file", name)
        except ValueError:
            pass
    path = root / name
    return path if path.is_file() else None


def write_tokenizer(out: Path, tok_file: Path, max_seq_len: int) -> int:
    """tokenizer.json (copied byte for byte) + the two HF side files; the EOS id."""
    from tokenizers import Tokenizer

    eos_id = Tokenizer.from_file(str(tok_file)).token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ExportError(
            f"{tok_file} has no {EOS_TOKEN} token (the corpus EOS); cannot export its tokenizer"
        )
    shutil.copyfile(tok_file, out / "tokenizer.json")
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return eos_id


# ---------------------------------------------------------------------------------- verification


def check_prompts(vocab_size: int, max_seq_len: int) -> list[torch.Tensor]:
    """Fixed token id sequences: a batch of two long prompts and one short one."""
    g = torch.Generator().manual_seed(0)
    long = min(max_seq_len, 32)
    return [
        torch.randint(0, vocab_size, (2, long), generator=g),
        torch.randint(0, vocab_size, (1, min(max_seq_len, 5)), generator=g),
    ]


def load_hf_model(out: Path):
    try:
        import transformers
    except ImportError:
        raise ExportError("exporting needs the `transformers` package: pip install -e .[hf]") from None
    return transformers.AutoModelForCausalLM.from_pretrained(str(out), **{_dtype_key(): torch.float32}).eval()


@torch.no_grad()
def max_logit_diff(hf_model, ours, prompts: list[torch.Tensor]) -> float:
    diff = 0.0
    for ids in prompts:
        a = hf_model(input_ids=ids).logits.float()
        b = ours(ids).float()
        diff = max(diff, (a - b).abs().max().item())
    return diff


def verify(out: Path, m: ModelConfig, sd: dict, dtype: str) -> dict:
    """Load `out` with transformers and compare its logits with our model on fixed prompts (fp32).

    bf16 exports: the strict check compares with our model holding the same bf16-rounded weights
    (computed in fp32), so it tests the conversion, not bf16 itself; the difference that the
    rounding makes to the fp32 master weights' logits is reported beside it."""
    hf_model = load_hf_model(out)
    ours = build_model(m, sd)
    prompts = check_prompts(m.vocab_size, m.max_seq_len)
    result = {}
    if dtype == "bf16":
        result["bf16_rounding_max_abs_diff"] = max_logit_diff(hf_model, ours, prompts)
        with torch.no_grad():
            for p in ours.parameters():  # in place: the consolidated tensors are not needed any more
                p.copy_(p.bfloat16().float())
    result["max_abs_diff"] = max_logit_diff(hf_model, ours, prompts)
    result["tolerance"] = FP32_TOL
    return result


# ---------------------------------------------------------------------------------- export


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    step: int | None = None,
    dtype: str = "bf16",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: str | Path | None = None,
) -> dict:
    """Export a run's committed checkpoint (newest, or `step`) to a verified HF model directory.
    Returns {out, step, arch, dtype, files, max_abs_diff, ...}. Raises ExportError or
    CheckpointError (a file that does not match its commit record) with nothing left at out_dir."""
    if dtype not in ("bf16", "fp32"):
        raise ExportError(f"--dtype {dtype}: choose bf16 or fp32")
    max_bytes = parse_size(max_shard_size)
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ExportError("exporting needs transformers and safetensors: pip install -e .[hf]") from None
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty; give a new directory (nothing overwritten)")

    weights = load_weights(run_dir, step)
    cfg, m = weights.cfg, weights.cfg.model
    tok_file = Path(tokenizer) if tokenizer else tokenizer_path(cfg)
    if tokenizer and not tok_file.is_file():
        raise ExportError(f"--tokenizer {tok_file} does not exist")

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        eos_id = 0
        files = []
        if tok_file is not None:
            eos_id = write_tokenizer(tmp, tok_file, m.max_seq_len)
            files += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
        else:
            log.warning(
                "no local tokenizer.json for data.path=%s: exported without tokenizer files "
                "(give tokenizer= / --tokenizer to include one)",
                cfg.data.path,
            )
        config = hf_config(m, dtype, eos_id)
        config.save_pretrained(str(tmp))
        import transformers

        transformers.GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id).save_pretrained(str(tmp))
        files += ["config.json", "generation_config.json"]
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        files += write_weights(tmp, m, weights.state_dict, torch_dtype, max_bytes)

        check = verify(tmp, m, weights.state_dict, dtype)
        print(
            f"export check: max abs logit diff, transformers vs our model = {check['max_abs_diff']:.3e} "
            f"(tolerance {check['tolerance']:.0e})"
            + (
                f"; bf16 rounding vs the fp32 weights: {check['bf16_rounding_max_abs_diff']:.3e}"
                if dtype == "bf16"
                else ""
            )
        )
        if not check["max_abs_diff"] <= check["tolerance"]:
            raise ExportError(
                f"the exported model's logits differ from ours by {check['max_abs_diff']:.3e} "
                f"(> {check['tolerance']:.0e}); nothing written to {out}"
            )
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "step": weights.found.step,
        "arch": m.arch,
        "dtype": dtype,
        "files": sorted(files),
        **check,
    }
