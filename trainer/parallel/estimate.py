"""Memory per device of a layout, on paper: what `pretrain plan` prints before anything runs.

Pure arithmetic on the config (no torch, no process group). Bytes per parameter element:

    precision   params  grads  optimizer (AdamW)
    bf16        2       2      12  (fp32 master copy + two fp32 moments)
    fp32        4       4      8   (two fp32 moments; the parameters are the master copy)

Sharding, in the order the plan applies it:

* TP splits every matrix of a block, the embedding and the output head by `tp`; norms (and the
  biases of row-parallel layers, learned positions) stay whole on every TP rank.
* PP gives each stage ~L/pp blocks (the first stages take the remainder); the embedding lives on
  the first stage, the final norm and the head on the last.
* ZeRO partitions over the DP group: stage 1 the optimizer state, stage 2 also the gradients,
  stage 3 also the parameters.

Activations per micro batch follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models"), with tensor parallelism and no sequence parallelism, 16-bit activations:

    per layer: s*b*h * (10 + 24/t + 5*a*s/(h*t)) bytes        (= s*b*h*(34 + 5*a*s/h) at t=1)

flash attention (fused kernels keep no (a, s, s) score matrix) drops the 5as/h term; fp32
activations double it; activation checkpointing keeps only each block's input (2*s*b*h bytes,
16-bit) plus one block's full set during its recompute. Under 1F1B the first stage holds up to pp
micro batches in flight (Korthikanti section 4.2.3), the last stage one. The logits add
b*s*V*(2 or 4)/tp bytes on the last stage. The formula was derived for GPT's 4h MLP; it is an
estimate for SwiGLU and GQA too, and leaves out allocator fragmentation, communication buffers,
ZeRO-3's prefetched parameters and the CUDA context (typically 1-3 GB more on a GPU).

Building the model comes before all of this, in fp32 (`build_memory`). ZeRO-3 builds it partitioned
(`parallel/zero_init.py`): a rank holds its fp32 1/world share (twice with TP, while the TP layers
replace the whole ones; at most half of what training holds) plus one whole parameter. Otherwise the
whole model is built in host memory on every rank (before TP slices it), 4 bytes per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import Config, ModelConfig

GB = 1e9  # decimal gigabytes, as device memory is sold

# bytes per parameter element: (params, grads, optimizer state)
BYTES_PER_PARAM: dict[str, tuple[int, int, int]] = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}


@dataclass(frozen=True)
class StageParams:
    """Parameter elements one device of a pipeline stage holds before ZeRO: `sharded` are split by
    TP already (this rank's slice), `replicated` are whole on every TP rank."""

    blocks: int  # transformer blocks on this stage
    sharded: int
    replicated: int

    @property
    def total(self) -> int:
        return self.sharded + self.replicated


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device of a stage needs, by kind."""

    stage: int
    blocks: int
    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.logits

    def gb(self) -> dict[str, float]:
        """Every figure in GB, the total included."""
        keys = ("params", "grads", "optimizer", "activations", "logits", "total")
        return {k: getattr(self, k) / GB for k in keys}


def blocks_per_stage(n_layers: int, pp: int) -> list[int]:
    """Blocks on each pipeline stage: as even as possible, the first stages take the remainder."""
    base, extra = divmod(n_layers, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def _block_params(m: ModelConfig) -> tuple[int, int]:
    """(TP-sharded, replicated) parameter elements of one block, whole (not yet divided by tp)."""
    d, ff, kv = m.d_model, m.ff_dim, m.kv_heads * m.head_dim
    if m.arch == "llama":  # wq, wo: d x d; wk, wv: d x kv; w1, w3, w2: d x ff; two RMSNorm weights
        return 2 * d * d + 2 * d * kv + 3 * d * ff, 2 * d
    # gpt2: column-parallel layers shard their biases; wo and w2 keep theirs whole (added after the
    # all-reduce); two LayerNorms of weight + bias.
    sharded = (d * d + d) + 2 * (d * kv + kv) + (d * ff + ff) + d * d + ff * d
    return sharded, 2 * d + 4 * d


def stage_params(m: ModelConfig, tp: int = 1, pp: int = 1) -> list[StageParams]:
    """Parameter elements on one device of each pipeline stage, after TP (before ZeRO). Summed over
    the stages with tp=1 this is `trainer.model.param_count` exactly."""
    if m.vocab_size <= 0:
        raise ValueError("model.vocab_size must be known (set it, or read it from the corpus manifest)")
    d, v = m.d_model, m.vocab_size
    b_sharded, b_repl = _block_params(m)
    out = []
    for s, n in enumerate(blocks_per_stage(m.n_layers, pp)):
        sharded, repl = n * b_sharded, n * b_repl
        if s == 0:  # token embedding (vocab-parallel); gpt2's learned positions stay whole
            sharded += v * d
            repl += m.max_seq_len * d if m.arch == "gpt2" else 0
        if s == pp - 1:  # final norm (+ bias for LayerNorm) and the output head
            repl += d if m.arch == "llama" else 2 * d
            sharded += 0 if m.tie_embeddings else v * d  # tied: the embedding matrix, counted once
        out.append(StageParams(blocks=n, sharded=sharded // tp, replicated=repl))
    return out


def activation_bytes_per_layer(
    seq_len: int,
    micro_batch: int,
    m: ModelConfig,
    tp: int = 1,
    flash: bool = False,
    bytes_per_value: int = 2,
) -> float:
    """Korthikanti et al. 2022: s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes for 16-bit activations,
    without sequence parallelism; flash attention drops the 5as/(ht) term, fp32 doubles it all."""
    s, b, h, a = seq_len, micro_batch, m.d_model, m.n_heads
    per_token = 10 + 24 / tp + (0 if flash else 5 * a * s / (h * tp))
    return s * b * h * per_token * bytes_per_value / 2


def estimate_memory(
    m: ModelConfig,
    *,
    tp: int,
    pp: int,
    dp: int,
    zero_stage: int,
    precision: str,
    micro_batch: int,
    seq_len: int,
    grad_accum: int = 1,
    activation_checkpointing: bool = False,
    flash: bool = False,
) -> list[MemoryEstimate]:
    """Bytes per device of each pipeline stage (one entry when pp=1)."""
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {', '.join(BYTES_PER_PARAM)}, got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    p_bytes, g_bytes, o_bytes = BYTES_PER_PARAM[precision]
    act_bytes = BYTES_PER_PARAM[precision][0]  # activations in the compute precision
    # ZeRO divides by dp what the stage partitions: 1 the optimizer, 2 + grads, 3 + params.
    p_div = dp if zero_stage >= 3 else 1
    g_div = dp if zero_stage >= 2 else 1
    o_div = dp if zero_stage >= 1 else 1

    full_layer = activation_bytes_per_layer(seq_len, micro_batch, m, tp, flash, act_bytes)
    kept_layer = 2 * seq_len * micro_batch * m.d_model * act_bytes / 2  # a block's input
    out = []
    for s, sp in enumerate(stage_params(m, tp, pp)):
        n = sp.total
        if activation_checkpointing:
            per_micro = sp.blocks * kept_layer + (full_layer if sp.blocks else 0)
        else:
            per_micro = sp.blocks * full_layer
        in_flight = min(pp - s, grad_accum) if pp > 1 else 1  # 1F1B: stage s holds pp - s
        logits = micro_batch * seq_len * m.vocab_size * act_bytes / tp if s == pp - 1 else 0.0
        out.append(
            MemoryEstimate(
                stage=s,
                blocks=sp.blocks,
                params=n * p_bytes / p_div,
                grads=n * g_bytes / g_div,
                optimizer=n * o_bytes / o_div,
                activations=per_micro * max(1, in_flight),
                logits=logits,
            )
        )
    return out


@dataclass(frozen=True)
class BuildMemory:
    """Bytes one rank needs while the model is built, before training (fp32)."""

    partitioned: bool  # ZeRO-3: built under deepspeed.zero.Init
    device: float  # partitioned: the rank's shares plus one whole parameter; whole: what moves there
    host: float  # partitioned: one whole parameter (drawn on the CPU); whole: the whole model


def build_memory(cfg: Config, world_size: int | None = None) -> BuildMemory:
    """What building the model costs one rank (see the module docstring)."""
    m, p = cfg.model, cfg.parallel
    world = world_size or cfg.cluster.num_workers
    whole = sum(s.total for s in stage_params(m))
    largest = 4 * max(m.vocab_size * m.d_model, m.d_model * m.ff_dim, m.d_model * m.n_heads * m.head_dim)
    if p.partitioned_build:
        share = 4 * whole / world * (2 if p.tp > 1 else 1)
        return BuildMemory(True, device=share + largest, host=largest)
    on_device = max(s.total for s in stage_params(m, p.tp, p.pp))  # this rank's, still fp32
    return BuildMemory(False, device=4 * on_device, host=4 * whole)


def resolved_precision(cfg: Config) -> str:
    """`train.precision`, with auto resolved the way the engine does on the device the config asks
    for: bf16 on GPU, fp32 on CPU (auto devices count as GPU when the cluster is told to use them)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and cfg.cluster.use_gpu == "true")
    return "bf16" if gpu else "fp32"


def uses_flash_attention(cfg: Config, precision: str) -> bool:
    """Whether attention runs a fused kernel that keeps no (a, s, s) score matrix."""
    if cfg.train.attention in ("flash", "efficient", "cudnn"):
        return True
    return cfg.train.attention == "auto" and precision == "bf16"  # torch picks flash on GPU in bf16


def estimate_for_config(cfg: Config, world_size: int | None = None) -> list[MemoryEstimate]:
    """`estimate_memory` with every input taken from a validated config (vocab_size must be set)."""
    p = cfg.parallel
    world = world_size or cfg.cluster.num_workers
    prec = resolved_precision(cfg)
    return estimate_memory(
        cfg.model,
        tp=p.tp,
        pp=p.pp,
        dp=cfg.dp(world),
        zero_stage=p.zero_stage,
        precision=prec,
        micro_batch=p.micro_batch_size,
        seq_len=cfg.data.seq_len,
        grad_accum=cfg.grad_accum(world),
        activation_checkpointing=p.activation_checkpointing,
        flash=uses_flash_attention(cfg, prec),
    )


def fmt_count(n: float) -> str:
    """6738415616 -> '6.74B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"
