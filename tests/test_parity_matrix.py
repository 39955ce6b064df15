"""The parity matrix: every parallel layout against one plain process, 10 steps, fp32, same data and
seed. Each layout's logged loss at every step equals the single-process (ZeRO-0) loss within 1e-5:

    world 2: dp2 ZeRO-1, ZeRO-2, ZeRO-3; tp2 ZeRO-0; pp2 ZeRO-1
    world 4: tp2 x dp2 ZeRO-3; pp2 x dp2 ZeRO-1; tp2 x pp2 ZeRO-1

One model for all (LLaMA style, GQA, 4 layers so pp=2 has 2 blocks a stage), micro 2 x global 8 (a
pipeline overlaps 2-4 micro batches) and a tight gradient clip that bites every step, so a
parameter missing from, or counted twice in, the global norm shows in the losses. All layouts of
one world size run in ONE spawned gloo world (`run_world` of tests/test_tensor_parallel.py), so the
torch + DeepSpeed import is paid once per world.
"""

from __future__ import annotations

import pytest

from tests.run_fixtures import LAYOUTS, tiny_config
from tests.test_tensor_parallel import dp_batches, run_world
from trainer.parallel.topology import Topology

V = 64  # affine_stream's vocabulary
STEPS = 10
TOL = 1e-5
MODEL = {"vocab_size": V, "arch": "llama", "n_heads": 4, "n_kv_heads": 2, "n_layers": 4}

WORLDS = {w: [n for n, layout in LAYOUTS.items() if layout[0] == w] for w in (2, 4)}


def _cfg(zero_stage: int, tp: int, pp: int, world: int):
    return tiny_config(
        model=MODEL,
        parallel={
            "zero_stage": zero_stage,
            "tp": tp,
            "pp": pp,
            "micro_batch_size": 2,
            "global_batch_size": 8,
        },
        # lr 1e-3: over 10 steps Adam amplifies fp32 summation-order differences (~1e-7) between layouts;
        # at 1e-2 they reach ~4e-5 by step 10, at 1e-3 they stay well inside TOL, while a wrong
        # gradient or a mis-counted norm still moves the loss by far more.
        optim={"lr": 1e-3, "warmup_steps": 2, "grad_clip": 0.05},
        train={"steps": STEPS, "precision": "fp32"},
        cluster={"num_workers": world},
    )


def _losses(zero_stage: int, tp: int, pp: int, session) -> dict[int, float]:
    """The logged per-step losses of one layout on this rank."""
    from trainer.loop import train

    cfg = _cfg(zero_stage, tp, pp, session.world_size)
    topo = Topology(session.world_size, session.rank, tp, pp)
    p = cfg.parallel
    batches = dp_batches(0, topo.dp_rank, topo.dp, p.micro_batch_size, p.global_batch_size)
    return train(cfg, session, batches=batches).losses


def _train_layouts(rank: int, world: int, names: list[str]) -> dict[str, dict[int, float]]:
    from trainer.session import Session

    session = Session(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    return {name: _losses(*LAYOUTS[name][1:], session) for name in names}


@pytest.fixture(scope="module")
def reference() -> dict[int, float]:
    """One plain process, ZeRO-0: the losses every layout must reproduce."""
    from trainer.session import Session

    return _losses(0, 1, 1, Session())


@pytest.fixture(scope="module")
def layout_losses(tmp_path_factory) -> dict[str, list[dict[int, float]]]:
    """name -> per-rank losses, from one spawned world per world size."""
    got: dict = {}
    for world, names in WORLDS.items():
        per_rank = run_world(world, tmp_path_factory.mktemp(f"matrix{world}"), _train_layouts, names)
        got.update({name: [r[name] for r in per_rank] for name in names})
    return got


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_loss_equals_one_process(name, layout_losses, reference):
    assert sorted(reference) == list(range(1, STEPS + 1))
    per_rank = layout_losses[name]
    for r, losses in enumerate(per_rank):
        assert losses == per_rank[0], f"{name}: rank {r} logged a different loss"
    diff = {s: abs(per_rank[0][s] - reference[s]) for s in reference}
    print(f"{name}: max abs loss diff vs one process over {STEPS} steps = {max(diff.values()):.2e}")
    assert max(diff.values()) <= TOL, (name, diff)
