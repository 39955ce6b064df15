"""Speed switches: each one is loss-parity tested against the plain setting (fp32, CPU), and the
GPU-only ones (flash/efficient attention) are refused on CPU with the field to change."""

import pytest

from tests.run_fixtures import tiny_config
from tests.test_loop import V, affine_stream
from trainer.config import ConfigError
from trainer.loop import train

STEPS = 4


def _losses(**sections):
    sections.setdefault("model", {}).update({"vocab_size": V})
    sections.setdefault("train", {}).update({"steps": STEPS})
    return train(tiny_config(**sections), batches=affine_stream(3)).losses


@pytest.fixture(scope="module")
def reference():
    return _losses()


def test_activation_checkpointing_parity(reference):
    got = _losses(parallel={"activation_checkpointing": True})
    assert got == pytest.approx(reference, abs=1e-6)


@pytest.mark.slow
def test_compile_parity(reference):
    got = _losses(train={"compile": True})
    assert got == pytest.approx(reference, abs=1e-4)


def test_math_attention_parity(reference):
    got = _losses(train={"attention": "math"})
    assert got == pytest.approx(reference, abs=1e-6)


def test_bf16_tracks_fp32(reference):
    got = _losses(train={"precision": "bf16"}, parallel={"zero_stage": 1})
    # bf16 keeps 8 mantissa bits: the curve follows fp32 closely, not bitwise.
    assert got == pytest.approx(reference, abs=3e-2)


def test_zero_stages_agree(reference):
    for stage in (0, 1, 2):
        assert _losses(parallel={"zero_stage": stage}) == pytest.approx(reference, abs=1e-5), stage


def test_fused_adamw_parity(reference):
    """torch's fused AdamW kernel (optim.fused) runs on CPU too: the same losses as its default,
    on ZeRO-3's flat fp32 partitions (the reference) and on ZeRO-0's own parameters."""
    assert _losses(optim={"fused": True}) == pytest.approx(reference, abs=1e-6)
    zero0 = _losses(parallel={"zero_stage": 0})
    assert _losses(parallel={"zero_stage": 0}, optim={"fused": True}) == pytest.approx(zero0, abs=1e-6)


def test_gpu_only_switches_refused_on_cpu():
    with pytest.raises(ConfigError, match="train.attention"):
        _losses(train={"attention": "flash"})


def test_gpu_only_switches_refused_at_config_time_when_device_is_cpu():
    with pytest.raises(ConfigError, match="train.attention"):
        tiny_config(train={"device": "cpu", "attention": "efficient"})


def test_grad_norm_is_reported_with_zero0():
    from tests.test_loop import affine_stream as stream

    class Keep:
        rows: list = []

        def log(self, m, step):
            self.rows.append(m)

        def flush(self, timeout_s=0):
            return True

        def close(self):
            pass

    keep = Keep()
    cfg = tiny_config(model={"vocab_size": V}, train={"steps": 2}, parallel={"zero_stage": 0})
    train(cfg, batches=stream(0), logger=keep)
    norms = [m["grad_norm"] for m in keep.rows if "grad_norm" in m]
    assert norms and all(n > 0 for n in norms)
