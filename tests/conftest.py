import os
import sys
from pathlib import Path

import pytest

# Before anything imports deepspeed: CPU accelerator, gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(os.path.dirname(os.__file__))


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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A real corpus: a few stdlib modules, BPE vocab 512, blocks of 33 tokens, 32 samples/shard."""
    from trainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("corpus") / "pystd"
    files = [
        str(STDLIB / n)
        for n in (
            "json/decoder.py",
            "json/encoder.py",
            "textwrap.py",
            "string.py",
            "fnmatch.py",
            "glob.py",
            "bisect.py",
            "heapq.py",
        )
    ]
    prepare(files, str(out), vocab_size=512, block_len=33, samples_per_shard=32, val_blocks=16, workers=1)
    return str(out)


@pytest.fixture()
def pretrain_cli():
    """Run the `pretrain` CLI as a user would, in a subprocess."""
    import subprocess

    def run(*args, cwd=None, timeout=600, env=None):
        e = dict(os.environ)
        e.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "launch.cli", *args],
            cwd=cwd or ROOT,
            env=e,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
