"""Tensor parallelism (Megatron style): layers swapped in by module name, sharded from the full weights.

Styles (the plan below maps module-name patterns to them):

* colwise: Linear whose output features are split; each rank computes its slice of the output
  from the full input. Its input goes through `copy_to_tp` (forward identity, backward all-reduce:
  every rank's slice contributes to the input's gradient).
* rowwise: Linear whose input features are split; each rank's partial product is summed with
  `reduce_from_tp` (forward all-reduce, backward identity). The bias is added once, after the sum.
* vocab: Embedding whose vocabulary rows are split; ids outside the local range give zeros, and
  the all-reduce assembles each row from the one rank that holds it.
* vocab_colwise: the output head as a colwise Linear over the vocabulary, WITHOUT a gather: it
  returns this rank's (B, T, V/tp) slice of the logits, which `vocab_parallel_cross_entropy`
  consumes. Full logits never exist on one rank.

So a block does two all-reduces forward (after wo, after w2) and two backward (at the inputs of
wq/wk/wv and w1/w3). Attention heads split with wq/wk/wv: the model takes head counts from the
weight shapes, and with GQA each rank keeps whole groups (n_kv_heads % tp == 0 is a config rule).
Norms, biases of rowwise layers and learned positions stay replicated: their inputs and output
gradients are identical on every TP rank, so their gradients are too and need no reduction.

Sharded parameters carry `tensor_model_parallel = True`, which DeepSpeed reads to count
replicated parameters only once (on TP rank 0) in the global gradient norm.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.config import ConfigError
from trainer.parallel.topology import Topology
from trainer.parallel.zero_params import full_shape, gathered

# Module-name pattern -> style. Patterns that match nothing (gpt2 has no mlp.w3) are skipped.
TP_PLAN: dict[str, str] = {
    "embed.tok": "vocab",
    "blocks.*.attn.wq": "colwise",
    "blocks.*.attn.wk": "colwise",
    "blocks.*.attn.wv": "colwise",
    "blocks.*.attn.wo": "rowwise",
    "blocks.*.mlp.w1": "colwise",  # llama gate / gpt2 up
    "blocks.*.mlp.w3": "colwise",  # llama up
    "blocks.*.mlp.w2": "rowwise",  # down
    "head.out": "vocab_colwise",
}


# ---------------------------------------------------------------------------------- communication


class _CopyToTP(torch.autograd.Function):
    """Forward identity; backward all-reduce (sum) over the TP group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward all-reduce (sum) over the TP group; backward identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


# ---------------------------------------------------------------------------------- layers


def _shard(full: torch.Tensor, dim: int, rank: int, size: int) -> nn.Parameter:
    """This rank's contiguous 1/size slice of `full` along `dim`, as a new parameter."""
    if full.shape[dim] % size:
        raise ValueError(f"dimension {dim} of a {tuple(full.shape)} weight is not divisible by tp={size}")
    return nn.Parameter(full.detach().chunk(size, dim=dim)[rank].clone(), requires_grad=full.requires_grad)


def _mark_sharded(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tensor_model_parallel = True  # DeepSpeed: counted on every TP rank in the grad norm
    p.partition_dim = dim
    p.partition_stride = 1
    return p


class ColumnParallelLinear(nn.Module):
    """y[..., local out] = x @ W[local out]^T + b[local out]. (..., in) -> (..., out/tp)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)

    def extra_repr(self) -> str:
        out, in_ = full_shape(self.weight)
        return f"in={in_}, out_local={out}, bias={self.bias is not None}"


class RowParallelLinear(nn.Module):
    """y = sum over TP ranks of x[..., local in] @ W[:, local in]^T, + b. (..., in/tp) -> (..., out)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        out, in_ = full_shape(self.weight)
        return f"in_local={in_}, out={out}, bias={self.bias is not None}"


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_end) of the table on this rank. (B, T) ids -> (B, T, D)."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, group):
        super().__init__()
        self.weight, self.group = weight, group
        self.vocab_start, self.vocab_end = vocab_start, vocab_start + full_shape(weight)[0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(x, self.group)

    def extra_repr(self) -> str:
        return f"vocab=[{self.vocab_start}, {self.vocab_end}), dim={full_shape(self.weight)[1]}"


# ---------------------------------------------------------------------------------- loss


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-position loss from vocab-sharded logits: three all-reduces of (N,) vectors (max,
    target logit, sum of exp) instead of gathering (N, V)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group) -> torch.Tensor:
        # logits: (N, V/tp) fp32, this rank's vocab slice; target: (N,) global ids.
        v_local = logits.shape[-1]
        start = dist.get_rank(group) * v_local
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)  # (N, V/tp), <= 0: exp cannot overflow

        outside = (target < start) | (target >= start + v_local)
        local_target = (target - start).masked_fill(outside, 0)
        rows = torch.arange(shifted.shape[0], device=shifted.device)
        target_logit = shifted[rows, local_target].masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit  # (N,)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, outside = ctx.saved_tensors
        # d loss_n / d logit_nv = softmax_nv - [v == target_n]; the one-hot lives on one rank only.
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= (~outside).to(grad.dtype)
        return grad * grad_loss.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    """Mean next-token loss over all B*T positions from (B, T, V/tp) vocab-sharded logits, fp32.
    Equals `trainer.model.cross_entropy` of the full logits, on every TP rank."""
    losses = _VocabParallelCrossEntropy.apply(logits.float().flatten(0, 1), targets.flatten(), group)
    return losses.mean()


# ---------------------------------------------------------------------------------- the swap


def _swap(module: nn.Module, style: str, topo: Topology, shards: dict[int, nn.Parameter]) -> nn.Module:
    r, n, group = topo.tp_rank, topo.tp, topo.tp_group

    def shard(p: torch.Tensor | None, dim: int) -> nn.Parameter | None:
        # Tied weights (one tensor under two names) are sharded once and stay tied.
        if p is None:
            return None
        if id(p) not in shards:
            shards[id(p)] = _mark_sharded(_shard(p, dim, r, n), dim)
        return shards[id(p)]

    if style == "vocab":
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"tp style 'vocab' needs an nn.Embedding, got {type(module).__name__}")
        weight = shard(module.weight, 0)
        return VocabParallelEmbedding(weight, r * full_shape(weight)[0], group)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"tp style {style!r} needs an nn.Linear, got {type(module).__name__}")
    if style in ("colwise", "vocab_colwise"):
        return ColumnParallelLinear(shard(module.weight, 0), shard(module.bias, 0), group)
    if style == "rowwise":
        bias = module.bias  # replicated: added once after the all-reduce
        return RowParallelLinear(shard(module.weight, 1), bias, group)
    raise ValueError(
        f"unknown tensor-parallel style {style!r} (known: colwise, rowwise, vocab, vocab_colwise)"
    )


def apply_tensor_parallel(model: nn.Module, topo: Topology, plan: dict[str, str] | None = None) -> nn.Module:
    """Swap the modules named in `plan` for their TP versions, in place, slicing this rank's shard
    from the full (identically seeded) weights: tp=N starts from exactly the function of tp=1."""
    if topo.tp == 1:
        return model
    if topo.tp_group is None:
        raise RuntimeError("apply_tensor_parallel needs Topology.init_groups() first")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", 0)
    if vocab % topo.tp:
        raise ConfigError(
            f"model.vocab_size ({vocab}, taken from the corpus when the config says 0) must be divisible "
            f"by parallel.tp ({topo.tp}); set model.vocab_size to a multiple of {topo.tp} that is >= {vocab}",
            field="model.vocab_size",
        )
    plan = TP_PLAN if plan is None else plan
    shards: dict[int, nn.Parameter] = {}
    swapped = 0
    for name, module in list(model.named_modules()):
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if style is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with gathered(module.parameters()):  # built partitioned (ZeRO-3): this one layer whole, briefly
            setattr(parent, child, _swap(module, style, topo, shards))
        swapped += 1
    if swapped == 0:
        raise ValueError("the tensor-parallel plan matched no module of this model")
    return model
