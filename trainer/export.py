"""A committed checkpoint of any layout -> one Hugging Face model directory, verified.

    export_run(run_dir, out_dir) -> <out_dir>/
        config.json                       LlamaForCausalLM (arch llama) or GPT2LMHeadModel (arch gpt2)
        generation_config.json            bos/eos = <|endoftext|>
        model.safetensors                 or model-0000k-of-0000n.safetensors + model.safetensors.index.json
        tokenizer.json                    the corpus tokenizer, byte for byte
        tokenizer_config.json, special_tokens_map.json   <|endoftext|> as bos/eos/unk

Order of work: pick the committed step (newest, or the one asked for) -> verify every file it lists
against the sha256 in its commit record (`CheckpointManager.verify`) -> only then unpickle
DeepSpeed's files -> consolidate to one fp32 state dict with our model's names
(`trainer/checkpoint/deepspeed_format.py`) -> rename/permute to HF's names, written shard by shard
-> load the directory with `transformers` and compare its logits with our `Transformer` on fixed
prompts. Output is written to a temporary sibling of `out_dir` that is renamed into place only when
the check passes: a failed export leaves nothing at `out_dir`.

RoPE: our model rotates interleaved pairs (x[2i], x[2i+1]); HF Llama rotates halves (x[i],
x[i + Dh/2]). The rows of wq and wk are permuted per head on export (HF's
`convert_llama_weights_to_hf.py` `permute`), so both compute the same function.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from trainer.checkpoint import (
    COMMIT,
    RESUME_INVARIANT,
    CheckpointError,
    CheckpointManager,
    Committed,
    consolidate,
)
from trainer.config import Config, ModelConfig, from_dict, load_yaml
from trainer.data.manifest import MANIFEST_NAME, load_manifest
from trainer.data.prepare import EOS_TOKEN
from trainer.data.storage import is_remote
from trainer.errors import PretrainError

log = logging.getLogger("pretrain")

DEFAULT_MAX_SHARD_SIZE = "5GB"
FP32_TOL = 1e-4


class ExportError(PretrainError, RuntimeError):
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
    committed = manager.committed()
    where = manager.store.where()
    if not committed:
        raise ExportError(f"{where} holds no committed checkpoint (no step_N/{COMMIT})")
    if step is None:
        step = committed[-1]
    elif step not in committed:
        raise ExportError(
            f"no committed checkpoint for step {step} in {where}; committed steps: "
            f"{', '.join(map(str, committed))}"
        )
    try:
        return manager.verify(step)
    except CheckpointError as e:
        others = [s for s in committed if s != step]
        hint = f"; other committed steps: {', '.join(map(str, others))} (--step N)" if others else ""
        raise CheckpointError(f"{e}{hint}") from None


def load_weights(run_dir: str | Path, step: int | None = None) -> RunWeights:
    """The verified, consolidated weights of a run's committed checkpoint (newest, or `step`)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    found = find_checkpoint(run_dir, cfg, step)
    sd = consolidate(found.path, found.record, cfg.model)
    vocab = sd["embed.tok.weight"].shape[0]
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
    want = found.record.get("config_fingerprint")
    if want and want != cfg.fingerprint(RESUME_INVARIANT):
        raise ExportError(
            f"{run_dir / 'config.yaml'}: its model section is not the one checkpoint {found.path} was "
            "trained with (config fingerprint differs); restore the run's own config.yaml"
        )
    _check_names(sd, cfg.model, found.path)
    return RunWeights(cfg, found, sd)


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


# Our ModelConfig field -> its name in (transformers.LlamaConfig, transformers.GPT2Config); None: that
# architecture has no such setting.
_HF_FIELDS = {
    "d_model": ("hidden_size", "n_embd"),
    "ff_dim": ("intermediate_size", "n_inner"),
    "n_layers": ("num_hidden_layers", "n_layer"),
    "n_heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads", None),
    "head_dim": ("head_dim", None),
    "max_seq_len": ("max_position_embeddings", "n_positions"),
    "norm_eps": ("rms_norm_eps", "layer_norm_epsilon"),
    "rope_theta": ("rope_theta", None),
}
# What each architecture fixes: its class, and the settings that are not config fields of ours.
_HF_ARCHS = {
    "llama": (
        "LlamaConfig",
        {
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "architectures": ["LlamaForCausalLM"],
        },
    ),
    "gpt2": (
        "GPT2Config",
        {
            "activation_function": "gelu_new",  # GELU, tanh approximation
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "architectures": ["GPT2LMHeadModel"],
        },
    ),
}


def hf_config(m: ModelConfig, dtype: str, eos_id: int):
    """The transformers config object of our model config."""
    import transformers

    column = 0 if m.arch == "llama" else 1  # of _HF_FIELDS
    class_name, fixed = _HF_ARCHS[m.arch]
    fields = {names[column]: getattr(m, ours) for ours, names in _HF_FIELDS.items() if names[column]}
    return getattr(transformers, class_name)(
        **fields,
        **fixed,
        vocab_size=m.vocab_size,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=m.tie_embeddings,
        **{_dtype_key(): "bfloat16" if dtype == "bf16" else "float32"},
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
    if (root / MANIFEST_NAME).is_file():  # its file names are checked to stay inside the corpus
        name = load_manifest(str(root)).tokenizer_file or name
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


def _check_request(out_dir: str | Path, dtype: str, max_shard_size: str | int) -> tuple[Path, int]:
    """(the absolute output directory, the shard size in bytes), or ExportError before any work."""
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
    return out, max_bytes


def write_hf_dir(
    out: Path, weights: RunWeights, tok_file: Path | None, dtype: str, max_bytes: int
) -> list[str]:
    """Tokenizer files (when there is a tokenizer), config, generation config and weights in
    `out`; the file names written."""
    import transformers

    cfg, m = weights.cfg, weights.cfg.model
    eos_id = 0
    files = []
    if tok_file is not None:
        eos_id = write_tokenizer(out, tok_file, m.max_seq_len)
        files += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    else:
        log.warning(
            "no local tokenizer.json for data.path=%s: exported without tokenizer files "
            "(give tokenizer= / --tokenizer to include one)",
            cfg.data.path,
        )
    hf_config(m, dtype, eos_id).save_pretrained(str(out))
    transformers.GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id).save_pretrained(str(out))
    files += ["config.json", "generation_config.json"]
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    return files + write_weights(out, m, weights.state_dict, torch_dtype, max_bytes)


def _verified(tmp: Path, weights: RunWeights, dtype: str, out: Path) -> dict:
    """verify() of the written directory, reported; ExportError when it is out of tolerance."""
    check = verify(tmp, weights.cfg.model, weights.state_dict, dtype)
    rounding = check.get("bf16_rounding_max_abs_diff")
    print(
        f"export check: max abs logit diff, transformers vs our model = {check['max_abs_diff']:.3e} "
        f"(tolerance {check['tolerance']:.0e})"
        + (f"; bf16 rounding vs the fp32 weights: {rounding:.3e}" if rounding is not None else "")
    )
    if not check["max_abs_diff"] <= check["tolerance"]:
        raise ExportError(
            f"the exported model's logits differ from ours by {check['max_abs_diff']:.3e} "
            f"(> {check['tolerance']:.0e}); nothing written to {out}"
        )
    return check


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
    out, max_bytes = _check_request(out_dir, dtype, max_shard_size)
    weights = load_weights(run_dir, step)
    tok_file = Path(tokenizer) if tokenizer else tokenizer_path(weights.cfg)
    if tokenizer and not tok_file.is_file():
        raise ExportError(f"--tokenizer {tok_file} does not exist")

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = write_hf_dir(tmp, weights, tok_file, dtype, max_bytes)
        check = _verified(tmp, weights, dtype, out)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "step": weights.found.step,
        "arch": weights.cfg.model.arch,
        "dtype": dtype,
        "files": sorted(files),
        **check,
    }
