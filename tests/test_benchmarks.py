"""The benchmark scripts run end to end on CPU (their real path: shards, loader, loop, metrics)."""

import json
import re
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
        assert r["zero_stage"] == 1 and r["attention"] == "n/a (cpu)"
        assert r["optimizer_step_ops"] > 0  # counted in one real optimizer step
    assert "dense bf16 peak used for MFU: none" in p.stdout
    assert "ours/plain" in p.stdout


def test_startup_benchmark_prints_the_breakdown(corpus, tmp_path):
    """`pretrain train configs/tiny-cpu.yaml` once, timed; on the test corpus (33-token blocks), with
    one worker and no MLflow to keep it short."""
    out = tmp_path / "startup.json"
    args = ["--data", corpus, "--steps", "1", "--repeats", "1", "--json", str(out)]
    for s in ("data.seq_len=32", "model.max_seq_len=32", "cluster.num_workers=1", "tracking.enabled=false"):
        args += ["--set", s]
    p = subprocess.run(
        [sys.executable, "benchmarks/startup.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (run,) = json.loads(out.read_text())
    phases = [
        "cli",
        "mlflow_run",
        "ray_init",
        "after_ray",
        "controller",
        "to_workers",
        "ray_train_setup",
        "imports",
        "process_group",
        "model",
    ]
    phases += ["deepspeed_initialize", "data_and_resume", "tracking", "first_step"]
    assert all(run[k] >= 0 for k in phases), run
    # consecutive: none missed or counted twice
    assert abs(run["total"] - sum(run[k] for k in phases)) < 1.0, run
    assert set(run["cpu_s"]) == {"driver", "ray_services", "ray_train_actors", "workers"}
    assert run["cpu_s"]["workers"] > 0
    assert "total to the first finished step" in p.stdout and "CPU seconds" in p.stdout


def test_overhead_benchmark_prints_every_ratio():
    """Plain loop, then `pretrain train` at ZeRO-0, ZeRO-3 and the quick-start layout, in a few short
    windows."""
    args = ["--steps", "12", "--log-every", "4", "--plain-steps", "4", "--rounds", "1"]
    args += ["--only", "zero0,zero3,quickstart"]
    p = subprocess.run(
        [sys.executable, "benchmarks/overhead.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ratios = re.findall(r"pretrain train, (.*?): median ratio ([\d.]+) over 1 rounds", p.stdout)
    assert [name for name, _ in ratios] == [
        "1 worker, ZeRO-0",
        "1 worker, ZeRO-3",
        "quick start (ZeRO-3, 2 workers of 1 thread, global batch 16)",
    ], p.stdout
    assert all(float(r) > 0 for _, r in ratios), p.stdout
    assert len(re.findall(r"tokens/s -> ratio [\d.]+ \(against", p.stdout)) == 3, p.stdout
    assert "steps 2-4 (start-up's tail)" in p.stdout and "load average" in p.stdout
    assert "plain PyTorch loop (2 threads, batch 16)" in p.stdout


def test_prepare_benchmark_prints_cleaning_and_minhash_rates(tmp_path):
    out = tmp_path / "prepare.json"
    p = subprocess.run(
        [
            sys.executable,
            "benchmarks/prepare.py",
            *("--mb", "0.2", "--tokenize-mb", "0.3", "--rounds", "1", "--json", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["mb_per_cpu_s"]["rensa (chosen)"] > 0 and figures["mb_per_cpu_s"]["numpy (ours)"] > 0
    assert set(figures["cleaning"]) == {
        "min_length",
        "gopher_quality",
        "gopher_repetition",
        "c4",
        "fineweb",
        "all five",
    }
    assert "rensa (chosen) / numpy (ours)" in p.stdout
    rates = figures["tokenize"]["tokens_per_s"]
    assert set(rates) == {
        "encode_batch",
        "prepare, local",
        "prepare, Ray 1 node",
        "prepare + dedup, local",
        "prepare + dedup, Ray 1 node",
        "Ray Data, tokenize only",
    }
    assert all(r > 0 for r in rates.values())
    assert "x encode_batch" in p.stdout and "Ray 1 node takes" in p.stdout
