"""ZeRO-3 gathers each transformer block as one unit (DeepSpeed's `leaf_module`): the DeepSpeed config
says so, the engine's blocks are flagged, and the losses are those of ZeRO-0 on the same data."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from tests.run_fixtures import tiny_config
from tests.test_tensor_parallel import dp_batches, run_world
from trainer.engine import deepspeed_config

V = 64  # affine_stream's vocabulary
STEPS = 4


def _cfg(zero_stage: int, world: int):
    return tiny_config(
        model={"vocab_size": V},
        parallel={"zero_stage": zero_stage, "micro_batch_size": 2, "global_batch_size": 8},
        train={"steps": STEPS},
        cluster={"num_workers": world},
    )


def test_zero3_config_names_the_block_as_fetch_unit():
    cpu = torch.device("cpu")
    zero3 = deepspeed_config(_cfg(3, 2), 2, cpu)["zero_optimization"]
    assert zero3["leaf_module"] == {"classes": ["trainer.model.Block"]}
    for stage in (0, 1, 2):  # nothing is gathered below ZeRO-3
        assert "leaf_module" not in deepspeed_config(_cfg(stage, 2), 2, cpu)["zero_optimization"]


def _train(rank: int, world: int) -> dict:
    from deepspeed.utils import z3_leaf_module

    from trainer.loop import build, train
    from trainer.session import Session

    session = Session(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    out = {}
    with ExitStack() as cleanup:
        t = build(_cfg(3, world), session, cleanup, batches=iter(()))
        model = t.engine.module
        out["leaf"] = [z3_leaf_module(m) for m in (model, model.embed, model.head, *model.blocks)]
    for stage in (0, 3):
        batches = dp_batches(0, rank, world, 2, 8)
        out[stage] = train(_cfg(stage, world), session, batches=batches).losses
    return out


@pytest.mark.slow
def test_zero3_blocks_are_fetch_units_with_zero0_losses(tmp_path):
    per_rank = run_world(2, tmp_path, _train)
    for got in per_rank:
        assert got["leaf"] == [False, False, False, True, True], "only the blocks are leaves"
        assert sorted(got[3]) == list(range(1, STEPS + 1))
        assert got[3] == pytest.approx(got[0], abs=1e-5)
