"""The GPU benchmark script runs end to end on CPU (its real path: shards, loader, loop, metrics)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "r.jsonl"
    p = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu.py",
            "--device",
            "cpu",
            "--quick",
            "--steps",
            "6",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["recipe"] for r in rows] == ["gpt2-124m", "llama-1b"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["plain_pytorch_tokens_per_s"] > 0
        assert r["mfu"] is None  # no invented peak on CPU
        assert set(r["breakdown_s"]) == {"forward", "backward", "optimizer"}
    assert "ours/plain" in p.stdout
