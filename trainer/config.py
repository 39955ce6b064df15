"""Typed, validated run configuration.

One dataclass per section; each field carries a one-line doc (the `doc` metadata) saying what it
is for and when to change it. Precedence, written once: CLI `--set a.b=c` > YAML > defaults.
Unknown keys, wrong types and impossible values raise `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from math import gcd, lcm
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.errors import PretrainError
from trainer.fsutil import write_text_atomic
from trainer.metrics import mask_uri_credentials, split_uri_credentials

log = logging.getLogger("pretrain")


class ConfigError(PretrainError, ValueError):
    """A config problem; the message names the file or field and the fix, `field` the field."""


def _f(default: Any, doc: str, key: str = "", **kw: Any) -> Any:
    """A field with its doc; `key`: its name in YAML when that is a Python keyword (`async`)."""
    meta = {"doc": doc, **({"key": key} if key else {})}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _key(f: dataclasses.Field) -> str:
    """A field's name in YAML and `--set`."""
    return f.metadata.get("key", f.name)


@dataclass
class ModelConfig:
    arch: Literal["llama", "gpt2"] = _f(
        "llama", "llama: RMSNorm+RoPE+SwiGLU+GQA; gpt2: LayerNorm+GELU+learned positions"
    )
    vocab_size: int = _f(0, "tokenizer vocabulary size; 0 = take it from the data manifest")
    d_model: int = _f(256, "hidden size")
    n_layers: int = _f(4, "number of transformer blocks")
    n_heads: int = _f(4, "attention heads; d_model must be divisible by it")
    n_kv_heads: int = _f(0, "key/value heads for grouped-query attention; 0 = n_heads (plain MHA)")
    d_ff: int = _f(0, "MLP hidden size; 0 = LLaMA's 8/3*d_model rounded up to 64 (gpt2: 4*d_model)")
    max_seq_len: int = _f(256, "longest sequence the model supports (rotary table / position table size)")
    rope_theta: float = _f(10000.0, "rotary embedding base; raise it for long contexts")
    norm_eps: float = _f(1e-5, "epsilon of RMSNorm/LayerNorm")
    tie_embeddings: bool = _f(False, "share the input embedding and the output projection")
    init_std: float = _f(
        0.02, "std of the normal init; residual projections are scaled by 1/sqrt(2*n_layers)"
    )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        return 64 * ((int(8 * self.d_model / 3) + 63) // 64)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class SourceConfig:
    path: str = _f("", "a prepared corpus of the mixture: directory or http(s)/s3 URL holding manifest.json")
    weight: float = _f(1.0, "its share of the samples is weight / (sum of the weights)")
    name: str = _f("", "its name in metrics (tokens/<name>); empty = the path's last part")


@dataclass
class DataConfig:
    path: str = _f(
        "data/pystdlib",
        "prepared corpus: directory or http(s)/s3 URL holding manifest.json; with data.sources, the "
        "source whose val split and tokenizer the run uses (left out or empty = the first source)",
    )
    sources: list[SourceConfig] = _f(
        [], "weighted mixture of prepared corpora [{path, weight, name}] (one tokenizer); empty = data.path"
    )
    seq_len: int = _f(256, "training sequence length; may be shorter than the stored block length")
    num_streams: int = _f(
        0, "logical streams S (a multiple of every DP size you will use); 0 = from the manifest"
    )
    prefetch: int = _f(4, "micro batches read ahead by a background thread per rank (0 = read inline)")
    loader_workers: int = _f(
        0, "shard reader threads per rank (network latency); the order never depends on it"
    )
    skip_samples: list = _f(
        [],
        "global sample ranges [[start, end], ...] the order leaves out (whole global batches, numbered "
        "as if nothing were skipped), e.g. a window a rollback skipped; the run adds its own to these",
    )


@dataclass
class ParallelConfig:
    zero_stage: int = _f(3, "DeepSpeed ZeRO stage 0-3 (0 = plain data parallel)")
    tp: int = _f(1, "tensor-parallel degree")
    pp: int = _f(1, "pipeline-parallel degree (needs zero_stage <= 1)")
    micro_batch_size: int = _f(8, "sequences per rank per forward pass")
    global_batch_size: int = _f(16, "sequences per optimizer step over all DP ranks; accumulation is derived")
    activation_checkpointing: bool = _f(False, "recompute each block in backward to save activation memory")
    zero_init: bool = _f(
        True,
        "ZeRO-3: build the model already partitioned over the ranks (deepspeed.zero.Init), so it never "
        "exists whole on one; false builds it whole first (same weights; for debugging)",
    )

    @property
    def partitioned_build(self) -> bool:
        """Whether the model is built partitioned: ZeRO-3 with `zero_init` (ZeRO-3 implies pp == 1)."""
        return self.zero_stage == 3 and self.pp == 1 and self.zero_init


@dataclass
class OptimConfig:
    lr: float = _f(3e-4, "peak learning rate after warmup")
    min_lr: float = _f(3e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(20, "linear warmup steps from 0 to lr")
    weight_decay: float = _f(
        0.1, "AdamW decoupled weight decay on matrices (norm weights and biases are not decayed)"
    )
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping")
    fused: bool = _f(
        False,
        "torch's fused AdamW kernel, GPU or CPU (a faster optimizer step, on CPU too); off = torch's default",
    )


@dataclass
class SpikeConfig:
    k: float = _f(0.0, "a loss above the running mean by k running standard deviations is a spike (0 = off)")
    window: int = _f(50, "steps in the running mean and deviation; no spike is called before that many")


@dataclass
class TrainConfig:
    steps: int = _f(300, "optimizer steps to train for (the LR schedule spans these)")
    stop_at: int = _f(0, "end this job at this step with a committed checkpoint (time-boxed jobs); 0 = steps")
    seed: int = _f(1234, "seed for init, data order and dropout")
    log_every: int = _f(10, "log metrics every N steps")
    eval_every: int = _f(0, "validation every N steps (0 = only at the end if eval_batches > 0)")
    eval_batches: int = _f(
        0, "global batches (of global_batch_size sequences) of the val split per evaluation (0 = none)"
    )
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", "auto = bf16 on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when a GPU is visible")
    compile: bool = _f(False, "torch.compile each transformer block (one compile, reused by every block)")
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = _f(
        "auto", "SDPA backend; auto lets torch pick (flash on GPU in bf16); flash/efficient/cudnn need a GPU"
    )
    torch_threads: int = _f(0, "intra-op CPU threads per worker; 0 = cores / workers on this node")
    peak_tflops: float = _f(0.0, "device peak dense TFLOP/s for MFU; 0 = detect (known GPUs), none on CPU")
    gc_every: int = _f(
        50,
        "Python garbage collection every N steps, the same step on every rank (no stragglers); 0 = Python's own",
    )
    hang_timeout_s: float = _f(
        0.0,
        "seconds without a finished step (on any rank) before the watchdog dumps every rank's stacks and "
        "restarts the group; 0 = hang_step_multiple x the median step time, at least hang_timeout_floor_s",
    )
    hang_startup_timeout_s: float = _f(
        1800.0, "the hang timeout before the first step and during a checkpoint or evaluation (generous)"
    )
    hang_step_multiple: float = _f(10.0, "automatic hang timeout: this many median step times")
    hang_timeout_floor_s: float = _f(300.0, "automatic hang timeout: at least this many seconds")
    straggler_ratio: float = _f(
        1.2, "a straggler event when the slowest rank's step time exceeds the median by this ratio"
    )
    straggler_windows: int = _f(3, "... for this many log windows in a row")
    nonfinite_tolerance: int = _f(
        3,
        "consecutive non-finite steps (each skipped, its samples with it) before rolling back to the "
        "newest commit",
    )
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    rollback_lr_scale: float = _f(1.0, "LR factor for the steps right after a rollback (1 = unchanged)")
    rollback_lr_steps: int = _f(0, "steps after a rollback that train at rollback_lr_scale x the LR")
    max_rollbacks: int = _f(10, "rollbacks in one attempt before the run stops as diverged")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "save a committed checkpoint every N steps (0 = only at the end)")
    keep: int = _f(2, "committed checkpoints kept (>= 2)")
    keep_every: int = _f(
        0, "also keep every checkpoint whose step is a multiple of this, permanently (0 = none)"
    )
    ignore_data_mismatch: bool = _f(
        False, "resume although the corpus, seed, streams or global batch differ from the checkpoint's"
    )
    save_final: bool = _f(True, "save a checkpoint when training ends")
    storage: str = _f(
        "", "where committed checkpoints are kept: empty = <run_dir>/checkpoints; or s3://bucket/prefix"
    )
    on_error: Literal["stop", "continue"] = _f(
        "stop",
        "a failed save (disk full, I/O or S3 error): stop the run (exit 2), or warn and retry at the next `every`",
    )
    async_: bool = _f(
        False,
        "save in the background: training stalls only for a copy of the state to host memory, a "
        "thread writes and hashes the files, the commit follows at a later step (needs host memory "
        "for one more copy of each rank's state); final and SIGTERM saves still finish before exit",
        key="async",
    )


@dataclass
class ClusterConfig:
    address: str = _f("", "Ray cluster address (ray://, auto, host:port); empty = start a local Ray")
    num_workers: int = _f(2, "Ray Train workers = DeepSpeed ranks")
    min_workers: int = _f(
        0,
        "elastic: fewest workers the run goes on with when nodes leave (DP shrinks, TP/PP stay "
        "unless elastic_model_parallel; the run grows back later); 0 = num_workers (off)",
    )
    elastic_check_s: float = _f(
        60.0, "elastic: seconds between checks, at a commit, whether the cluster can hold more workers"
    )
    elastic_model_parallel: bool = _f(
        False,
        "elastic: a group size that no layout with parallel.tp/pp fits may run with lower TP and PP "
        "(divisors of theirs; the checkpoint is converted); false = only DP changes",
    )
    use_gpu: Literal["auto", "true", "false"] = _f(
        "auto", "one GPU per worker; auto = when the cluster has GPUs"
    )
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker")
    resources_per_worker: dict = _f(
        {}, "extra custom Ray resources per worker, e.g. {accelerator_type:H100: 0.01}"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _f(
        "PACK", "how workers are placed on nodes"
    )
    max_failures: int = _f(2, "worker-group restarts Ray Train may do before the run fails")
    storage_path: str = _f("runs", "where runs live: <storage_path>/<run_name>/")
    run_name: str = _f("", "run name; empty = <config name>-<timestamp>")
    lease_timeout_s: float = _f(
        180.0,
        "seconds a driver's run lease may go without a heartbeat before another driver takes the run "
        "over; raise it on a filesystem that stalls for longer",
    )
    hang_watchdog: bool = _f(True, "watch the ranks' progress from the driver (train.hang_timeout_s)")
    collective_timeout_s: float = _f(
        900.0,
        "seconds a rank waits in one collective, once the first step is done, before its process group "
        "fails it (start-up, checkpoint saves and evaluations get train.hang_startup_timeout_s); keep it "
        "above the hang timeout, so that the watchdog dumps the stacks first",
    )


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "log to MLflow")
    uri: str = _f(
        "sqlite:///mlflow.db",
        "MLflow tracking URI, no credentials in it (MLFLOW_TRACKING_USERNAME/_PASSWORD or _TOKEN give "
        "them); default is a SQLite store in the working dir",
    )
    experiment: str = _f("pretrain", "MLflow experiment name")
    system_metrics_every_s: float = _f(10.0, "CPU/memory/GPU sampling interval per node (0 = off)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    name: str = _f("run", "config name (defaults to the YAML file's stem)")

    # ------------------------------------------------------------------ derived layout
    def dp(self, world_size: int | None = None) -> int:
        world = world_size or self.cluster.num_workers
        return world // (self.parallel.tp * self.parallel.pp)

    def grad_accum(self, world_size: int | None = None) -> int:
        return self.parallel.global_batch_size // (self.parallel.micro_batch_size * self.dp(world_size))

    def to_dict(self) -> dict:
        return _as_dict(self)

    def fingerprint(self, sections: tuple[str, ...] = ("model",)) -> str:
        """Hash of the sections that must not change across a resume."""
        d = self.to_dict()
        blob = json.dumps({k: d[k] for k in sections}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self) -> Config:
        _validate(self)
        return self


# ---------------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}", field=where)
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} has the wrong type", field=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}", field=where)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}", field=where)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}", field=where)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}", field=where)
        return value
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}", field=where)
        return list(value)
    if origin is list:  # a list of sections (data.sources): each item built like a section
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}", field=where)
        (item_tp,) = typing.get_args(tp)
        return [
            _build(item_tp, v, f"{where}[{i}]")
            if dataclasses.is_dataclass(item_tp)
            else _coerce(v, item_tp, where)
            for i, v in enumerate(value)
        ]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}", field=where)
        return dict(value)
    raise ConfigError(f"{where}: unsupported field type {tp}", field=where)


def _as_dict(obj: Any) -> Any:
    """dataclasses.asdict with each field under its YAML key (sections inside lists too)."""
    if dataclasses.is_dataclass(obj):
        return {_key(f): _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _as_dict(x) for k, x in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_dict(x) for x in obj)
    return obj


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}", field=where)
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{path}: unknown key (known keys here: {known})", field=path)
        name = fields[key].name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, path)
        else:
            kwargs[name] = _coerce(value, tp, path)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], parsed c). Values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100", field="--set")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"--set {item}: {k} is not a section", field="--set")
            node = node[k]
        node[keys[-1]] = value
    return raw


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist", path=str(p))
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}", path=str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read: {e}", path=str(p)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping of sections", path=str(p))
    raw.setdefault("name", p.stem)
    return raw


def from_dict(raw: dict) -> Config:
    data = raw.get("data")
    if isinstance(data, dict) and data.get("sources") and not data.get("path"):
        first = data["sources"][0]  # a mixture's val split and tokenizer: the first source's by default
        if isinstance(first, dict) and isinstance(first.get("path"), str):
            raw = {**raw, "data": {**data, "path": first["path"]}}
    tracking = raw.get("tracking")
    if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str):
        raw = {**raw, "tracking": {**tracking, "uri": take_tracking_credentials(tracking["uri"])}}
    return _build(Config, raw, "").validate()


# MLflow's own variables for a tracking server's credentials (basic auth; or a bearer token).
MLFLOW_CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_warned_uris: set[str] = set()


def take_tracking_credentials(uri: str) -> str:
    """`uri` without credentials: the run stores, logs, ships and prints only that. A tracking
    server's `user:password@` moves into MLFLOW_TRACKING_USERNAME/_PASSWORD of this process (and so
    of the Ray workers it starts), unless those are set already; one warning says to set them
    instead. A password in another store's URI (a database) is refused: MLflow has no variable
    for it, and `pretrain ui` would pass it on `mlflow server`'s command line."""
    clean, user, password = split_uri_credentials(uri)
    if clean == uri:
        return uri
    if not uri.startswith(("http://", "https://")):
        _need(
            password is None,
            "tracking.uri",
            f"tracking.uri {clean} carries a password, which the run would store with its config; give "
            "it the database's own way (PostgreSQL: PGPASSWORD or ~/.pgpass) and leave it out of tracking.uri",
        )
        return uri  # a user name alone (postgresql://alice@db/mlflow) is no secret
    _need(
        password is not None,
        "tracking.uri",
        f"tracking.uri {clean} carries a user name (or token) but no password; give credentials as "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) and "
        f"tracking.uri as {clean}",
    )
    names = " and ".join(MLFLOW_CREDENTIAL_VARS[:2])
    if any(os.environ.get(n) for n in MLFLOW_CREDENTIAL_VARS[:2]):
        taken = f"{names} are set already and are used instead"
    else:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password
        taken = f"they are used from {names} of this process and the workers it starts"
    if clean not in _warned_uris:
        _warned_uris.add(clean)
        log.warning(
            "tracking.uri carries credentials; %s, and the run keeps tracking.uri as %s. "
            "Set %s (or MLFLOW_TRACKING_TOKEN) instead of writing credentials into the URI.",
            taken,
            clean,
            names,
        )
    return clean


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """YAML file + `--set` overrides -> validated Config."""
    raw = load_yaml(path)
    apply_overrides(raw, overrides or [])
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", field=e.field, path=str(path)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML, written whole or not at all (a run is resumed from it)."""
    _check_credentials(cfg)  # the last guard before a file: a Config made in code skips from_dict
    write_text_atomic(str(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolve_model_config(cfg: Config, manifest: Any) -> Config:
    """Fill model.vocab_size from the corpus manifest (a `Manifest`, or None) when the config
    leaves it 0; refuse a vocabulary smaller than the tokenizer's (ConfigError, a ValueError)."""
    if cfg.model.vocab_size == 0:
        if manifest is None:
            raise ConfigError(
                "model.vocab_size is 0 and there is no corpus manifest to take it from",
                field="model.vocab_size",
            )
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=manifest.vocab_size))
    if manifest is not None and cfg.model.vocab_size < manifest.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
            f"({manifest.vocab_size}) in {cfg.data.path}; set model.vocab_size: 0 to take it from the corpus",
            field="model.vocab_size",
            path=cfg.data.path,
        )
    return cfg


# ---------------------------------------------------------------------------------- validation


def _validate(c: Config) -> None:
    """Every rule a config must keep, in a fixed order: the first broken one is reported."""
    _check_credentials(c)
    _check_ranges(c)
    _check_optim(c.optim)
    _check_model(c.model, c.data)
    _check_layout(c)
    _check_run(c)
    _check_skips(c)
    _check_sources(c.data)


def _need(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(msg, field=field)


# Fields that must be > 0, and fields that must be >= 0 (0 means "off" or "derive it").
_POSITIVE = {
    "model": ("d_model", "n_layers", "n_heads", "max_seq_len"),
    "data": ("seq_len",),
    "parallel": ("tp", "pp", "micro_batch_size", "global_batch_size"),
    "train": (
        "steps",
        "log_every",
        "nonfinite_tolerance",
        "rollback_lr_scale",
        "hang_startup_timeout_s",
        "hang_step_multiple",
        "hang_timeout_floor_s",
        "straggler_ratio",
    ),
    "cluster": ("num_workers", "collective_timeout_s"),
}
_NON_NEGATIVE = {
    "model": ("vocab_size", "n_kv_heads", "d_ff"),
    "optim": ("warmup_steps", "weight_decay", "grad_clip", "min_lr"),
    "checkpoint": ("every", "keep_every"),
    "train": (
        "eval_every",
        "eval_batches",
        "torch_threads",
        "peak_tflops",
        "stop_at",
        "gc_every",
        "hang_timeout_s",
        "straggler_windows",
        "rollback_lr_steps",
        "max_rollbacks",
    ),
    "cluster": ("max_failures", "min_workers", "elastic_check_s", "elastic_model_parallel"),
    "data": ("num_streams", "prefetch", "loader_workers"),
    "tracking": ("system_metrics_every_s",),
}


def _strings(value: Any, name: str = "") -> typing.Iterator[tuple[str, str]]:
    """(dotted name, value) of every string in a config dict, at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{name}.{k}" if name else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{name}[{i}]")
    elif isinstance(value, str):
        yield name, value


def _check_credentials(c: Config) -> None:
    """No field holds a `scheme://user:password@` URI: the run stores its config (config.yaml,
    run.json, a submitted job's files) and credentials come from the environment instead."""
    for name, value in _strings(c.to_dict()):
        shown = mask_uri_credentials(value)
        _need(
            shown == value,
            name,
            f"{name} ({shown}) carries a password, which the run would store with its config; leave it "
            "out: S3 takes credentials from AWS's own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "~/.aws, an instance role), an MLflow server from MLFLOW_TRACKING_USERNAME/_PASSWORD",
        )


def _check_ranges(c: Config) -> None:
    for sections, ok, bound in (
        (_POSITIVE, lambda v: v > 0, "> 0"),
        (_NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
    ):
        for sec, names in sections.items():
            for n in names:
                v = getattr(getattr(c, sec), n)
                _need(ok(v), f"{sec}.{n}", f"{sec}.{n} must be {bound}, got {v}")


def _check_skips(c: Config) -> None:
    """data.skip_samples: [start, end] pairs of whole global batches; train.spike in range."""
    gb = c.parallel.global_batch_size
    for r in c.data.skip_samples:
        ok = isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)
        _need(
            ok and 0 <= r[0] < r[1] and r[0] % gb == 0 and r[1] % gb == 0,
            "data.skip_samples",
            f"data.skip_samples: {r!r} is not a range [start, end] of global sample numbers with "
            f"0 <= start < end, both multiples of parallel.global_batch_size ({gb}): whole steps are skipped",
        )
    s = c.train.spike
    _need(s.k >= 0, "train.spike.k", f"train.spike.k must be >= 0 (0 = off), got {s.k}")
    _need(s.window >= 2, "train.spike.window", f"train.spike.window must be >= 2, got {s.window}")


def _check_optim(o: OptimConfig) -> None:
    _need(o.lr > 0, "optim.lr", f"optim.lr must be > 0, got {o.lr}")
    _need(o.min_lr <= o.lr, "optim.min_lr", f"optim.min_lr ({o.min_lr}) must be <= optim.lr ({o.lr})")
    _need(
        0 <= o.beta1 < 1 and 0 <= o.beta2 < 1,
        "optim.beta2" if 0 <= o.beta1 < 1 else "optim.beta1",
        "optim.beta1 and optim.beta2 must be in [0, 1)",
    )
    _need(o.eps > 0, "optim.eps", f"optim.eps must be > 0, got {o.eps}")


def _check_model(m: ModelConfig, data: DataConfig) -> None:
    _need(
        m.norm_eps > 0 and m.init_std > 0,
        "model.init_std" if m.norm_eps > 0 else "model.norm_eps",
        "model.norm_eps and model.init_std must be > 0",
    )
    _need(
        m.d_model % m.n_heads == 0,
        "model.d_model",
        f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})",
    )
    _need(
        m.arch == "gpt2" or m.head_dim % 2 == 0,
        "model.d_model",
        f"model.d_model / model.n_heads = {m.head_dim} must be even for rotary embeddings",
    )
    _need(
        m.n_heads % m.kv_heads == 0,
        "model.n_kv_heads",
        f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})",
    )
    _need(
        m.arch == "llama" or m.n_kv_heads in (0, m.n_heads),
        "model.n_kv_heads",
        "model.n_kv_heads: the gpt2 arch has no GQA; set 0",
    )
    _need(
        data.seq_len <= m.max_seq_len,
        "data.seq_len",
        f"data.seq_len ({data.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})",
    )


def _check_layout(c: Config) -> None:
    """The parallel layout against DeepSpeed's limits, the world size and the model's shapes."""
    m, p, world = c.model, c.parallel, c.cluster.num_workers
    _need(
        p.zero_stage in (0, 1, 2, 3),
        "parallel.zero_stage",
        f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}",
    )
    _need(
        p.pp == 1 or p.zero_stage <= 1,
        "parallel.zero_stage",
        f"parallel.pp={p.pp} needs parallel.zero_stage<=1 (DeepSpeed forbids ZeRO-2/3 with pipeline "
        "parallelism); set zero_stage: 1 or pp: 1",
    )
    _need(
        world % (p.tp * p.pp) == 0,
        "cluster.num_workers",
        f"cluster.num_workers ({world}) must be divisible by parallel.tp*parallel.pp ({p.tp * p.pp})",
    )
    dp = c.dp()
    _check_min_workers(c)
    _need(
        p.global_batch_size % (p.micro_batch_size * dp) == 0,
        "parallel.global_batch_size",
        f"parallel.global_batch_size ({p.global_batch_size}) must be divisible by "
        f"parallel.micro_batch_size*dp ({p.micro_batch_size}*{dp})",
    )
    for n, field_name in (("n_heads", "n_heads"), ("kv_heads", "n_kv_heads"), ("ff_dim", "d_ff")):
        v = getattr(m, n)
        _need(
            v % p.tp == 0,
            f"model.{field_name}",
            f"model.{field_name} ({v}) must be divisible by parallel.tp ({p.tp})",
        )
    _need(
        m.vocab_size == 0 or m.vocab_size % p.tp == 0,
        "model.vocab_size",
        f"model.vocab_size ({m.vocab_size}) must be divisible by parallel.tp ({p.tp}) (each TP rank holds "
        "vocab_size/tp rows of the embedding and the output head); round it up to a multiple of tp",
    )
    _need(p.pp <= m.n_layers, "parallel.pp", f"parallel.pp ({p.pp}) must be <= model.n_layers ({m.n_layers})")
    _need(
        p.pp == 1 or not m.tie_embeddings,
        "model.tie_embeddings",
        f"model.tie_embeddings is not supported with parallel.pp={p.pp} (the shared matrix would live on "
        "the first and the last stage); set tie_embeddings: false or pp: 1",
    )


def _check_min_workers(c: Config) -> None:
    """An elastic run's smallest group must be a layout of its own (same TP/PP, same global batch)."""
    p, least, most = c.parallel, c.cluster.min_workers, c.cluster.num_workers
    if least == 0:
        return
    _need(
        least <= most,
        "cluster.min_workers",
        f"cluster.min_workers ({least}) must be <= cluster.num_workers ({most}) (0 = elastic off)",
    )
    if c.cluster.elastic_model_parallel:  # any size with a layout of lower TP/PP (cluster/elastic.py)
        return
    _need(
        least % (p.tp * p.pp) == 0
        and p.global_batch_size % (p.micro_batch_size * (least // (p.tp * p.pp))) == 0,
        "cluster.min_workers",
        f"cluster.min_workers ({least}) must be a multiple of parallel.tp*parallel.pp ({p.tp * p.pp}) whose "
        f"dp divides parallel.global_batch_size/parallel.micro_batch_size "
        f"({p.global_batch_size}/{p.micro_batch_size})",
    )


def _check_run(c: Config) -> None:
    """Where the run keeps its checkpoints, where it runs, and what it reads."""
    k, cl = c.checkpoint, c.cluster
    _need(
        k.keep >= 2,
        "checkpoint.keep",
        f"checkpoint.keep must be >= 2 (the newest may be mid-write), got {k.keep}",
    )
    _need(
        k.storage == "" or (k.storage.startswith("s3://") and k.storage[len("s3://") :].strip("/") != ""),
        "checkpoint.storage",
        f"checkpoint.storage ({k.storage!r}) must be empty (<run_dir>/checkpoints) or an s3://bucket/prefix",
    )
    _need(
        k.on_error == "stop" or k.every > 0,
        "checkpoint.on_error",
        "checkpoint.on_error: continue retries a failed save at the next checkpoint.every steps, and "
        "checkpoint.every is 0 (only the final save); set checkpoint.every or on_error: stop",
    )
    _need(
        cl.cpus_per_worker > 0,
        "cluster.cpus_per_worker",
        f"cluster.cpus_per_worker must be > 0, got {cl.cpus_per_worker}",
    )
    _need(
        c.train.attention in ("auto", "math") or c.train.device != "cpu",
        "train.attention",
        f"train.attention={c.train.attention} is a CUDA kernel; set train.attention: auto or math on CPU",
    )
    _need(cl.storage_path != "", "cluster.storage_path", "cluster.storage_path must not be empty")
    _need(
        cl.lease_timeout_s >= 1,
        "cluster.lease_timeout_s",
        f"cluster.lease_timeout_s must be >= 1 (the lease is renewed every few seconds), got {cl.lease_timeout_s}",
    )
    _need(
        c.data.path != "",
        "data.path",
        "data.path must name the prepared corpus (run `pretrain prepare` first)",
    )


# The mixture repeats every sum-of-integer-weights samples: a schedule longer than this is refused.
MAX_MIX_PERIOD = 1 << 16
# A source's name, as its MLflow metric `tokens/<name>` can hold it.
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def source_name(src: SourceConfig) -> str:
    """A source's name in metrics: its `name`, else the last part of its path."""
    return src.name or src.path.rstrip("/").rsplit("/", 1)[-1]


def mix_weights(sources: list[SourceConfig]) -> list[int]:
    """The weights as the smallest integers in the same ratio (0.7, 0.3 -> 7, 3), read as the
    decimals the config wrote: the mixture repeats every sum(weights) samples."""
    exact = [Fraction(repr(s.weight)) for s in sources]
    scale = lcm(*(f.denominator for f in exact))
    ints = [int(f * scale) for f in exact]
    g = gcd(*ints)
    return [i // g for i in ints]


def _check_sources(d: DataConfig) -> None:
    """A mixture's static rules; what needs the corpora (missing ones, tokenizers) is checked when
    they are opened, before anything starts (trainer/data/mixing.py)."""
    if not d.sources:
        return
    names = set()
    for i, src in enumerate(d.sources):
        where = f"data.sources[{i}]"
        _need(src.path != "", f"{where}.path", f"{where}.path must name a prepared corpus")
        _need(
            src.weight > 0 and src.weight != float("inf"),
            f"{where}.weight",
            f"{where}.weight must be > 0, got {src.weight} (leave a corpus out of data.sources instead)",
        )
        name = source_name(src)
        _need(
            name not in names and _SOURCE_NAME.fullmatch(name) is not None,
            f"{where}.name",
            f"{where} ({src.path}) is named {name!r}, "
            f"{'like another source' if name in names else 'which a metric name cannot hold'}; set "
            f"{where}.name to a distinct name of letters, digits, '_', '-' and '.' (its metric is tokens/<name>)",
        )
        names.add(name)
    _need(
        d.path in [s.path for s in d.sources],
        "data.path",
        f"data.path ({d.path}) must be one of data.sources' paths (its val split and tokenizer are the "
        "run's), or empty for the first source's",
    )
    period = sum(mix_weights(d.sources))
    _need(
        period <= MAX_MIX_PERIOD,
        "data.sources",
        f"data.sources weights {[s.weight for s in d.sources]} repeat only every {period} samples "
        f"(more than {MAX_MIX_PERIOD}); round them to fewer decimals",
    )


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every field, for `pretrain train --help-config`."""
    out = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{_key(f)}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe_fields(tp, name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((name, repr(default), f.metadata.get("doc", "")))
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if dataclasses.is_dataclass(item):  # the fields of each list item: data.sources[].path
                out += describe_fields(item, name + "[].")
    return out
