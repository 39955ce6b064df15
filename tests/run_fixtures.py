"""The tiny config, the tiny run's `--set` list and the matrix of parallel layouts: plain values and
functions (no pytest, no environment changes), so the benchmarks use the very ones the tests use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# name -> (world, zero stage, tp, pp): every parallel layout, in worlds of 2 and 4 ranks.
LAYOUTS: dict[str, tuple[int, int, int, int]] = {
    "dp2-zero1": (2, 1, 1, 1),
    "dp2-zero2": (2, 2, 1, 1),
    "dp2-zero3": (2, 3, 1, 1),
    "tp2-zero0": (2, 0, 2, 1),
    "pp2-zero1": (2, 1, 1, 2),
    "tp2xdp2-zero3": (4, 3, 2, 1),
    "pp2xdp2-zero1": (4, 1, 1, 2),
    "tp2xpp2-zero1": (4, 1, 2, 2),
}


def tiny_config(**sections):
    """A validated tiny config: 2 layers, d_model 64, seq 32; sections override fields."""
    from trainer.config import from_dict

    raw = {
        "model": {
            "vocab_size": 0,
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "max_seq_len": 32,
        },
        "data": {"seq_len": 32, "prefetch": 0},
        "parallel": {"zero_stage": 3, "micro_batch_size": 4, "global_batch_size": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 6, "log_every": 1, "precision": "fp32", "torch_threads": 1},
        "cluster": {"num_workers": 1},
        "tracking": {"enabled": False},
    }
    for sec, values in sections.items():
        raw.setdefault(sec, {}).update(values)
    return from_dict(raw)


def tiny_run(corpus: str, tmp_path, name: str, steps: int, *more: str, tracking: bool = False) -> list[str]:
    """`--set` items that make `pretrain train configs/tiny-cpu.yaml` a tiny run on the test corpus
    (2 layers, d_model 64, seq 32, batch 8 in micro batches of 4, every step logged), named `name`
    under `<tmp_path>/runs`, MLflow in `<tmp_path>/mlflow.db` when `tracking`; `more` after."""
    return [
        f"data.path={corpus}",
        "data.seq_len=32",
        "model.max_seq_len=32",
        "model.d_model=64",
        "model.n_layers=2",
        "parallel.micro_batch_size=4",
        "parallel.global_batch_size=8",
        f"train.steps={steps}",
        "train.log_every=1",
        "optim.warmup_steps=2",
        "train.torch_threads=1",
        f"cluster.run_name={name}",
        f"cluster.storage_path={tmp_path}/runs",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db" if tracking else "tracking.enabled=false",
        *more,
    ]


def run_pretrain(
    *args: str, env: dict | None = None, extra_env: dict | None = None, cwd=None, timeout: int = 600, **kw
):
    """The `pretrain` CLI as a user runs it, in a subprocess: `env` the whole environment (default:
    this process's), `extra_env` set on top of it."""
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=cwd or Path(__file__).resolve().parents[1],
        env={**(os.environ if env is None else env), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


HOOKS = str(Path(__file__).parent / "fault_hooks")  # sitecustomize.py: test-only fault injection


def hooked_env(**hooks: str) -> dict:
    """Environment variables that arm tests/fault_hooks in every Python process a `pretrain`
    subprocess starts (its Ray workers too): the hooks' variables, and PYTHONPATH with the hooks first."""
    return {"PYTHONPATH": os.pathsep.join([HOOKS, *filter(None, [os.environ.get("PYTHONPATH")])]), **hooks}


def committed(run: Path) -> list[int]:
    """The steps of a run directory that have a commit record."""
    ck = run / "checkpoints"
    return sorted(
        int(p.name[5:]) for p in ck.iterdir() if p.name.startswith("step_") and (p / "commit.json").is_file()
    )


def step_dirs(run: Path) -> list[int]:
    """Every step directory of a run directory, committed or not."""
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
