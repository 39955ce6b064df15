"""`pretrain plan`: the layout, parameter count, FLOPs and memory estimate of a config, on paper."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from trainer.config import ModelConfig
from trainer.model import param_count
from trainer.parallel.estimate import (
    GB,
    activation_bytes_per_layer,
    blocks_per_stage,
    estimate_memory,
    stage_params,
)

LLAMA_7B = [
    "model.vocab_size=32000",
    "model.d_model=4096",
    "model.n_layers=32",
    "model.n_heads=32",
    "model.n_kv_heads=0",
    "model.d_ff=11008",
    "model.max_seq_len=2048",
    "data.seq_len=2048",
]
LLAMA_7B_PARAMS = 6_738_415_616  # the LLaMA paper's 6.7B, closed form


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    """Run `pretrain plan ...` in this process."""
    from launch import cli

    rc = cli.main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_llama_1b_prints_groups_params_flops_memory(capsys):
    rc, out, err = _plan(capsys, str(ROOT / "configs/llama-1b.yaml"), "--set", "parallel.tp=2")
    assert rc == 0, err
    assert "world 16 = pp 1 x dp 8 x tp 2" in out
    assert "tp groups (8): [0,1] [2,3]" in out
    assert "dp groups (2): [0,2,4,6,8,10,12,14] [1,3,5,7,9,11,13,15]" in out
    assert "pp groups (16):" in out
    assert f"parameters: {param_count(ModelConfig(**_llama_1b())):,}" in out
    assert "flops per token:" in out
    assert "memory per device" in out and "optimizer" in out and "activations" in out


def _llama_1b() -> dict:
    return dict(
        vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, max_seq_len=2048
    )


def test_plan_7b_parameter_count_is_exact(capsys):
    args = [str(ROOT / "configs/llama-1b.yaml")] + [a for s in LLAMA_7B for a in ("--set", s)]
    rc, out, err = _plan(capsys, *args)
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("parameters:"))
    printed = int(line.split()[1].replace(",", ""))
    assert abs(printed - LLAMA_7B_PARAMS) <= 0.1 * LLAMA_7B_PARAMS
    assert printed == LLAMA_7B_PARAMS


def test_plan_pp_with_zero3_exits_2_with_the_config_message(capsys):
    rc, out, err = _plan(capsys, str(ROOT / "configs/llama-1b.yaml"), "--set", "parallel.pp=2")
    assert rc == 2
    assert "parallel.pp=2 needs parallel.zero_stage<=1" in err and "Traceback" not in err


def test_plan_without_vocab_or_manifest_says_it_is_needed(capsys, tmp_path):
    rc, out, err = _plan(
        capsys, str(ROOT / "configs/tiny-cpu.yaml"), "--set", f"data.path={tmp_path / 'nowhere'}"
    )
    assert rc == 0, err
    assert "model.vocab_size is 0" in out and "--set model.vocab_size=N" in out
    assert "dp groups (1): [0,1]" in out


def test_plan_reads_vocab_from_the_corpus_manifest(capsys, corpus):
    rc, out, err = _plan(capsys, str(ROOT / "configs/tiny-cpu.yaml"), "--set", f"data.path={corpus}")
    assert rc == 0, err
    assert "vocab_size: 512 (from the corpus manifest" in out and "parameters:" in out


# ---------------------------------------------------------------------------------- estimate.py


def test_stage_params_sum_to_param_count_and_shard_by_tp_and_pp():
    for arch, tied in (("llama", False), ("gpt2", True), ("gpt2", False)):
        m = ModelConfig(arch=arch, vocab_size=512, d_model=64, n_layers=5, n_heads=4, tie_embeddings=tied)
        assert sum(s.total for s in stage_params(m)) == param_count(m)
        two = stage_params(m, tp=2)[0]
        assert two.replicated == stage_params(m)[0].replicated
        assert two.sharded * 2 == stage_params(m)[0].sharded
    assert blocks_per_stage(5, 2) == [3, 2]
    m = ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4)
    first, last = stage_params(m, pp=2)
    assert first.total + last.total == param_count(m)
    assert first.sharded - last.sharded == 0  # the embedding on one end, the head on the other


def test_memory_shrinks_with_zero_stage_as_documented():
    m = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=2048)
    n, dp = param_count(m), 8
    est = {
        z: estimate_memory(m, tp=1, pp=1, dp=dp, zero_stage=z, precision="bf16", micro_batch=1, seq_len=2048)[
            0
        ]
        for z in range(4)
    }
    expected = {  # (params, grads, optimizer) bytes: 2 + 2 + 12 per parameter in bf16
        0: (2 * n, 2 * n, 12 * n),
        1: (2 * n, 2 * n, 12 * n / dp),
        2: (2 * n, 2 * n / dp, 12 * n / dp),
        3: (2 * n / dp, 2 * n / dp, 12 * n / dp),
    }
    for z, e in est.items():
        assert (e.params, e.grads, e.optimizer) == pytest.approx(expected[z])
        assert e.activations == est[0].activations  # ZeRO does not touch activations
    totals = [est[z].total for z in range(4)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    # ZeRO-0 model states of a 7B model: 16 bytes per parameter, ~108 GB.
    assert (est[0].params + est[0].grads + est[0].optimizer) / GB == pytest.approx(16 * n / GB)
    fp32 = estimate_memory(m, tp=1, pp=1, dp=dp, zero_stage=0, precision="fp32", micro_batch=1, seq_len=2048)
    assert fp32[0].optimizer == 8 * n and fp32[0].params == 4 * n


def test_activation_estimate_korthikanti():
    m = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, max_seq_len=2048)
    s, b, h, a = 2048, 1, 4096, 32
    assert activation_bytes_per_layer(s, b, m) == s * b * h * (34 + 5 * a * s / h)
    assert activation_bytes_per_layer(s, b, m, flash=True) == s * b * h * 34
    assert activation_bytes_per_layer(s, b, m, tp=2, flash=True) == s * b * h * 22
    plain, ckpt = (
        estimate_memory(
            m,
            tp=1,
            pp=1,
            dp=1,
            zero_stage=0,
            precision="bf16",
            micro_batch=b,
            seq_len=s,
            activation_checkpointing=c,
        )[0]
        for c in (False, True)
    )
    assert plain.activations == 32 * s * b * h * (34 + 5 * a * s / h)
    assert ckpt.activations == 32 * 2 * s * b * h + s * b * h * (34 + 5 * a * s / h)
    assert plain.logits == b * s * 32000 * 2


def test_pipeline_first_stage_holds_pp_micro_batches_in_flight():
    m = ModelConfig(vocab_size=1000, d_model=256, n_layers=8, n_heads=4)
    first, last = estimate_memory(
        m, tp=1, pp=2, dp=1, zero_stage=1, precision="fp32", micro_batch=2, seq_len=128, grad_accum=4
    )
    per_layer = activation_bytes_per_layer(128, 2, m, bytes_per_value=4)
    assert first.activations == pytest.approx(2 * 4 * per_layer) and first.logits == 0
    assert last.activations == pytest.approx(4 * per_layer) and last.logits == 2 * 128 * 1000 * 4
