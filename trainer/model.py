"""Decoder-only transformer: LLaMA style (RMSNorm, RoPE, SwiGLU, GQA) or GPT-2 style.

No parallelism lives here: `trainer/parallel/` swaps layers by module name (TP) and cuts the
model into pipeline stages. The model is laid out as embed -> blocks -> head so that those
three pieces can become pipeline stages unchanged.

Shape legend: B batch, T sequence, D d_model, H query heads, KV key/value heads,
Dh head dim (D / H), F MLP hidden, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for bf16 stability, return in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # (T, Dh/2)
    return freqs.cos().float(), freqs.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, h, T, Dh); rotate pairs (x[2i], x[2i+1]) as in the original RoPE formulation.
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # (B, h, T, Dh/2)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, h, T, Dh/2, 2)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        bias = cfg.arch == "gpt2"
        self.rotary = cfg.arch == "llama"
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the weights, so a tensor-parallel shard (fewer local heads)
        # runs this same code unchanged.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, Dh)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, Dh)
        if self.rotary:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*Dh)
        return self.wo(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, F) -> (B, T, D)


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.w2 = nn.Linear(cfg.ff_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.arch == "llama" else GeluMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Embedding(nn.Module):
    """Token (+ learned position, gpt2) embedding: (B, T) ids -> (B, T, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return x


class Head(nn.Module):
    """Final norm + output projection: (B, T, D) -> (B, T, V) logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, init: bool = True):
        """`init=False` skips the `init_weights` pass (the layers keep their default init): for a
        builder that applies `init_parameter` itself, one parameter at a time, after construction."""
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the data manifest when 0)")
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = Head(cfg)
        if cfg.tie_embeddings:
            self.head.out.weight = self.embed.tok.weight
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.block_fn = None  # set by the parallel plan for activation checkpointing / compile
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, Dh/2)
        x = self.embed(idx)  # (B, T, D)
        for block in self.blocks:
            x = self.block_fn(block, x, cos, sin) if self.block_fn else block(x, cos, sin)
        return self.head(x)  # (B, T, V)


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Every parameter by `init_parameter`, in `named_parameters` order (the order fixes which
    random numbers each one draws)."""
    for name, p in model.named_parameters():
        init_parameter(name, p, cfg)


def init_parameter(name: str, p: torch.Tensor, cfg: ModelConfig) -> None:
    """Normal(0, init_std); residual output projections scaled by 1/sqrt(2*n_layers) (GPT-2)."""
    if p.dim() == 1:
        # norm weights are ones, biases zeros
        nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
    elif name.endswith(("attn.wo.weight", "mlp.w2.weight")):
        nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
    else:
        nn.init.normal_(p, mean=0.0, std=cfg.init_std)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over all B*T positions, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count (tied embeddings counted once)."""
    d, v, L, ff = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.ff_dim
    kv = cfg.kv_heads * cfg.head_dim
    if cfg.arch == "llama":
        block = d * d * 2 + 2 * d * kv + 3 * d * ff + 2 * d
        embed, head_norm = v * d, d
    else:
        block = (d * d + d) * 2 + 2 * (d * kv + kv) + (d * ff + ff) + (ff * d + d) + 4 * d
        embed, head_norm = v * d + cfg.max_seq_len * d, 2 * d
    head = 0 if cfg.tie_embeddings else v * d
    return embed + L * block + head_norm + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + 12 * L * H * Q * T (N excludes embeddings)."""
    # N counts the output projection (a real matmul) but not the input lookup table; with tied
    # embeddings the one shared matrix is the output projection.
    n = param_count(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    if cfg.arch == "gpt2":
        n -= cfg.max_seq_len * cfg.d_model
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
