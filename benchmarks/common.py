"""Shared pieces of the benchmarks: a random-token corpus in the real shard format, and the plain
PyTorch loop our training path is measured against."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch

from trainer.config import ModelConfig
from trainer.data.manifest import Manifest, ShardInfo, SplitInfo, write_manifest
from trainer.model import Transformer, cross_entropy


def write_random_corpus(
    out: str,
    vocab_size: int,
    block_len: int,
    n_train: int,
    n_val: int = 8,
    samples_per_shard: int = 64,
    seed: int = 0,
) -> Manifest:
    """Uniform random token blocks as WebDataset shards + a sealed manifest (no tokenizer needed:
    throughput does not depend on what the tokens mean)."""
    import webdataset as wds

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = "<u2" if vocab_size <= 65536 else "<u4"
    splits = {}
    key = 0
    for split, n in (("train", n_train), ("val", n_val)):
        shards = []
        for s in range(0, n, samples_per_shard):
            name = f"{split}-{s // samples_per_shard:06d}.tar"
            count = min(samples_per_shard, n - s)
            with wds.TarWriter(os.path.join(out, name), encoder=False) as w:
                for _ in range(count):
                    w.write(
                        {
                            "__key__": f"{key:09d}",
                            "tokens": rng.integers(0, vocab_size, block_len).astype(dtype).tobytes(),
                        }
                    )
                    key += 1
            data = open(os.path.join(out, name), "rb").read()
            shards.append(
                ShardInfo(name, count, count * block_len, len(data), hashlib.sha256(data).hexdigest())
            )
        splits[split] = SplitInfo(shards, n, n * block_len)
    manifest = Manifest(
        version=1,
        dtype="uint16" if dtype == "<u2" else "uint32",
        block_len=block_len,
        vocab_size=vocab_size,
        eos_id=0,
        tokenizer_file="tokenizer.json",
        tokenizer_sha256="",
        splits=splits,
        source={"generator": "benchmarks.common.write_random_corpus", "seed": seed},
    ).seal()
    write_manifest(out, manifest)
    return manifest


def plain_pytorch_tokens_per_s(
    cfg: ModelConfig,
    *,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    device: str,
    bf16: bool,
    compile_blocks: bool,
    lr: float = 3e-4,
    accum: int = 1,
    fused: bool | None = None,
) -> float:
    """The baseline: the same model trained by the ~20-line loop everyone writes first; `accum`
    micro batches of `batch` sequences per optimizer step. torch's fused AdamW when `fused`
    (default: on GPU), so that a comparison runs the same optimizer kernel on both sides."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if compile_blocks:
        for block in model.blocks:
            block.compile(dynamic=False)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        fused=device == "cuda" if fused is None else fused,
    )
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g) for _ in range(4)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            t0 = time.perf_counter()
        for micro in range(accum):
            seq = data[(step * accum + micro) % len(data)].to(device, non_blocking=True)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                loss = cross_entropy(model(seq[:, :-1]), seq[:, 1:]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    sync()
    return steps * accum * batch * seq_len / (time.perf_counter() - t0)
