"""The optimizer step launches a fixed number of operations and waits on the device for nothing but
the one agreed finite check, whatever the number of parameters (issue #25: on a GPU each
per-parameter kernel is a CPU-side launch, and each host sync drains the queue).

Counted with a `TorchDispatchMode`: every non-view operation the step dispatches (on a GPU, a kernel
launch each) and every `_local_scalar_dense` (`.item()`, `bool(tensor)`: a host sync)."""

from __future__ import annotations

import math
from collections import Counter
from contextlib import ExitStack

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.run_fixtures import tiny_config
from tests.test_loop import affine_stream
from trainer.session import Session

SYNC = "aten._local_scalar_dense.default"


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _build(cleanup: ExitStack, n_layers: int, zero_stage: int, precision: str = "bf16"):
    from trainer import loop

    cfg = tiny_config(
        model={"vocab_size": 64, "n_layers": n_layers},
        parallel={"zero_stage": zero_stage},
        train={"precision": precision},
        optim={"fused": True},  # torch's fused AdamW, as the GPU recipes (it also runs on a CPU)
    )
    return loop.build(cfg, Session(), cleanup, batches=affine_stream(0, 4))


def _step_ops(n_layers: int, zero_stage: int, precision: str = "bf16") -> tuple[Counter, Counter]:
    """(ops of the whole optimizer step: the finite check and DeepSpeed's step, ops of the finite
    check alone) in the second training step (the first creates the optimizer state)."""
    from trainer import loop
    from trainer.anomaly import AnomalyGuard

    step, check, counting = OpCount(), OpCount(), [False]
    real_check = AnomalyGuard.check

    def counted_check(self):  # the engine holds the bound check from build on
        if not counting[0]:
            return real_check(self)
        with check:
            return real_check(self)

    with ExitStack() as cleanup:
        AnomalyGuard.check = counted_check
        cleanup.callback(setattr, AnomalyGuard, "check", real_check)
        t = _build(cleanup, n_layers, zero_stage, precision)
        loop.train_step(t, 0, t.next_micro_batches()[0])
        take = t.engine._take_model_step

        def counted_take(*args, **kwargs):
            with step:
                return take(*args, **kwargs)

        t.engine._take_model_step, counting[0] = counted_take, True
        loop.train_step(t, 1, t.next_micro_batches()[0])
        assert t.anomaly.verdict == "ok" and t.engine.global_steps == 2
        return step.ops, check.ops


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_the_zero_step_launches_the_same_ops_for_twice_the_layers_and_never_waits(zero_stage):
    two, _ = _step_ops(2, zero_stage)
    four, _ = _step_ops(4, zero_stage)
    grown = {k: (two[k], four[k]) for k in four if two[k] != four[k]}
    assert not grown, f"per-parameter operations in the ZeRO-{zero_stage} step: {grown}"
    # no host sync in DeepSpeed's step: the finite check's one read is a `tolist`, not counted here
    assert four[SYNC] == 0, four[SYNC]


def test_the_finite_check_is_one_reduction_whatever_the_number_of_gradients():
    # ZeRO-0 keeps one gradient per parameter: the check sees 2 x more tensors with 4 layers than 2.
    # (torch 2.13's `get_total_norm` takes them in one `_foreach_norm` on every device, CPU included.)
    _, two = _step_ops(2, 0, "fp32")
    _, four = _step_ops(4, 0, "fp32")
    assert two == four, {k: (two[k], four[k]) for k in four | two if two[k] != four[k]}
    assert four["aten._foreach_norm.Scalar"] == 1 and four[SYNC] == 0, four


def test_the_multi_tensor_norm_and_clip_are_deepspeeds_own_numbers():
    """On real ZeRO-1 gradients: the foreach norm equals DeepSpeed's per-parameter one (fp64 norms,
    bit for bit on a CPU), and the device-side clip scales as DeepSpeed's does for every norm,
    invalid ones included."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from trainer import loop

    with ExitStack() as cleanup:
        t = _build(cleanup, 2, 1, "fp32")
        opt, seen = t.engine.optimizer, []
        take = t.engine._take_model_step

        def compare(*args, **kwargs):
            for i, grads in enumerate(opt.averaged_gradients.values()):
                params = opt.params_in_partition[i]
                ours = opt.get_grad_norm_direct(grads, params)
                theirs = DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, grads, params)
                seen.append((ours.item(), theirs.item()))
            return take(*args, **kwargs)

        t.engine._take_model_step = compare
        loop.train_step(t, 0, t.next_micro_batches()[0])
        assert len(seen) == 2 and all(a == b and a > 0 for a, b in seen), seen

        g = torch.randn(100)
        for norm in (0.5, 3.0, -1.0, math.inf, math.nan):
            ours, theirs = g.clone(), g.clone()
            opt.unscale_and_clip_grads([ours], torch.tensor(norm))
            DeepSpeedZeroOptimizer.unscale_and_clip_grads(opt, [theirs], torch.tensor(norm))
            assert torch.equal(ours, theirs), norm
        assert not torch.equal(ours, g)  # an invalid norm clips as an infinite one: grads scaled to 0


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_without_deepspeeds_overflow_scan_a_nonfinite_bf16_gradient_still_leaves_the_step_out(zero_stage):
    """bf16 turns DeepSpeed's own scan off (`bf16.check_grad_overflow: false`): the anomaly guard's
    check alone keeps a NaN gradient out of the weights and the optimizer state."""
    from trainer import loop

    with ExitStack() as cleanup:
        t = _build(cleanup, 2, zero_stage)
        assert t.engine.optimizer.check_grad_overflow is False
        masters = [p.detach().clone() for g in t.optimizer.optimizer.param_groups for p in g["params"]]
        hook = next(t.engine.module.parameters()).register_hook(lambda g: g * float("nan"))
        loop.train_step(t, 0, t.next_micro_batches()[0])
        assert (t.anomaly.verdict, t.engine.global_steps) == ("nonfinite", 0)
        after = [p.detach() for g in t.optimizer.optimizer.param_groups for p in g["params"]]
        assert all(torch.equal(a, b) for a, b in zip(masters, after, strict=True))
        assert not t.optimizer.optimizer.state  # no moment was created from the NaN gradient
        hook.remove()
        loop.train_step(t, 0, t.next_micro_batches()[0])
        assert (t.anomaly.verdict, t.engine.global_steps) == ("ok", 1)
        assert all(torch.isfinite(p).all() for g in t.optimizer.optimizer.param_groups for p in g["params"])
