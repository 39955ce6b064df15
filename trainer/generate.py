"""Text from a committed checkpoint: the same verified consolidation as `trainer/export.py`, our own
`Transformer`, the corpus tokenizer, temperature / top-k sampling, stop at <|endoftext|>."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.data.prepare import EOS_TOKEN
from trainer.export import ExportError, build_model, load_weights, tokenizer_path


@torch.no_grad()
def sample(
    model,
    ids: list[int],
    max_tokens: int,
    temperature: float,
    top_k: int,
    eos_id: int | None,
    generator: torch.Generator,
) -> list[int]:
    """The new token ids after `ids` (at most max_tokens; stops after EOS, which is not returned).
    temperature 0 = greedy; top_k 0 = the whole vocabulary."""
    ctx = model.cfg.max_seq_len
    seq = torch.tensor([ids], dtype=torch.long)
    new: list[int] = []
    for _ in range(max_tokens):
        logits = model(seq[:, -ctx:])[0, -1].float()  # (V,)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        if nxt == eos_id:
            break
        new.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return new


def generate(
    run_dir: str | Path,
    prompt: str,
    max_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    step: int | None = None,
    seed: int = 0,
    tokenizer: str | Path | None = None,
) -> str:
    """The prompt followed by the model's continuation, decoded with the corpus tokenizer."""
    from tokenizers import Tokenizer

    if max_tokens < 0 or temperature < 0 or top_k < 0:
        raise ExportError("--max-tokens, --temperature and --top-k must be >= 0")
    weights = load_weights(run_dir, step)
    cfg = weights.cfg
    tok_file = Path(tokenizer) if tokenizer else tokenizer_path(cfg)
    if tok_file is None or not tok_file.is_file():
        raise ExportError(
            f"no tokenizer.json for data.path={cfg.data.path} (not a local corpus directory); "
            "give the tokenizer file (--tokenizer)"
        )
    tok = Tokenizer.from_file(str(tok_file))
    eos_id = tok.token_to_id(EOS_TOKEN)
    ids = tok.encode(prompt).ids if prompt else []
    if not ids:  # nothing to condition on: start a new document
        if eos_id is None:
            raise ExportError(f"an empty prompt needs {EOS_TOKEN} in {tok_file}")
        ids = [eos_id]
    if max(ids) >= cfg.model.vocab_size:
        raise ExportError(f"{tok_file} gives ids beyond the model's vocabulary ({cfg.model.vocab_size})")
    model = build_model(cfg.model, weights.state_dict)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    new = sample(model, ids, max_tokens, temperature, top_k, eos_id, generator)
    prompt_ids = [] if ids == [eos_id] and not prompt else ids
    return tok.decode(prompt_ids + new, skip_special_tokens=False)
