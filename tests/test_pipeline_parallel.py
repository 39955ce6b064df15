"""Pipeline parallelism: the loop's loss parity against one plain process (fp32, same data) for pp=2
(ZeRO-0 and ZeRO-1, and with activation checkpointing), pp=2 x dp=2 and pp=2 x tp=2, exact resume
under pp=2, the rank layout, and the config refusals.

Spawned gloo worlds as in tests/test_tensor_parallel.py: one world per world size runs its cases in
turn, so the torch + DeepSpeed import is paid once per process.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from tests.run_fixtures import tiny_config
from tests.test_tensor_parallel import dp_batches, run_world
from trainer.config import ConfigError
from trainer.parallel.topology import Topology

V = 64  # affine_stream's vocabulary
STEPS = 5
TOL = 1e-5
LLAMA = {"arch": "llama", "n_heads": 4, "n_kv_heads": 2, "n_layers": 4}  # GQA

# name -> (zero stage, tp, pp, world, activation checkpointing)
CASES = {
    "pp2-zero1": (1, 1, 2, 2, False),
    "pp2-zero0": (0, 1, 2, 2, False),
    "pp2-zero1-actckpt": (1, 1, 2, 2, True),
    "pp2xdp2-zero1": (1, 1, 2, 4, False),
    "pp2xtp2-zero1": (1, 2, 2, 4, False),
}
WORLDS = {w: [n for n, c in CASES.items() if c[3] == w] for w in (2, 4)}


def _cfg(
    zero_stage: int, tp: int = 1, pp: int = 1, world: int = 1, model=None, checkpoint=None, actckpt=False
):
    return tiny_config(
        model={"vocab_size": V, **LLAMA, **(model or {})},
        # micro 2, global 8: 4 micro batches per pipeline at dp=1, 2 at dp=2, so 1F1B overlaps
        parallel={
            "zero_stage": zero_stage,
            "tp": tp,
            "pp": pp,
            "activation_checkpointing": actckpt,
            "micro_batch_size": 2,
            "global_batch_size": 8,
        },
        # A tight clip bites every step: a stage's parameters missing from (or counted twice in) the
        # global gradient norm would show in the losses.
        optim={"lr": 1e-2, "warmup_steps": 2, "grad_clip": 0.05},
        train={"steps": STEPS},
        cluster={"num_workers": world},
        checkpoint=checkpoint or {},
    )


def _batches(cfg, topo: Topology):
    p = cfg.parallel
    return dp_batches(0, topo.dp_rank, topo.dp, p.micro_batch_size, p.global_batch_size)


def _run_case(name: str, session) -> dict[int, float]:
    """One case's logged losses on this rank; a session of one process runs it at pp=tp=dp=1."""
    from trainer.loop import train

    zero_stage, tp, pp, _, actckpt = CASES[name]
    if session.world_size == 1:
        tp = pp = 1
    cfg = _cfg(zero_stage, tp, pp, session.world_size, actckpt=actckpt)
    topo = Topology(session.world_size, session.rank, tp, pp)
    return train(cfg, session, batches=_batches(cfg, topo)).losses


def _train_cases(rank: int, world: int, names: list[str], resume_dir: str) -> dict:
    from trainer.loop import train
    from trainer.session import Session

    def session(run_dir: str = "") -> Session:
        return Session(rank=rank, world_size=world, local_rank=rank, local_world_size=world, run_dir=run_dir)

    out = {name: _run_case(name, session()) for name in names}
    if resume_dir:
        # Stop at step 2 with a committed checkpoint (every stage's layer and optimizer files),
        # resume to the end; the synthetic batches are positioned by hand.
        cfg = _cfg(1, 1, 2, world, checkpoint={"every": 2})
        topo = Topology(world, rank, 1, 2)
        first = train(
            replace(cfg, train=replace(cfg.train, stop_at=2)),
            session(resume_dir),
            batches=_batches(cfg, topo),
        )
        skipped = itertools.islice(_batches(cfg, topo), 2 * cfg.grad_accum(world), None)
        resumed = train(cfg, session(resume_dir), batches=skipped)
        out["resume"] = (first.losses, resumed.losses)
    return out


@pytest.fixture(scope="module")
def pp_losses(tmp_path_factory) -> dict[str, list]:
    """name -> per-rank losses, from one spawned world per world size."""
    got: dict = {}
    for world, names in WORLDS.items():
        resume_dir = str(tmp_path_factory.mktemp("resume")) if world == 2 else ""
        per_rank = run_world(world, tmp_path_factory.mktemp(f"world{world}"), _train_cases, names, resume_dir)
        for name in [*names, "resume"] if resume_dir else names:
            got[name] = [r[name] for r in per_rank]
    return got


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_loss_parity_with_one_process(name, pp_losses):
    from trainer.session import Session

    ref = _run_case(name, Session())  # the same config at pp=1, tp=1, dp=1, one plain process
    per_rank = pp_losses[name]
    assert sorted(ref) == list(range(1, STEPS + 1))
    for r, losses in enumerate(per_rank):
        assert losses == per_rank[0], f"rank {r} logged a different loss"
    diff = max(abs(per_rank[0][s] - ref[s]) for s in ref)
    print(f"{name}: max abs loss diff vs one process over {STEPS} steps = {diff:.2e}")
    assert diff <= TOL, (name, per_rank[0], ref)


@pytest.mark.slow
def test_checkpoint_resume_under_pp2_is_exact(pp_losses):
    full = pp_losses["pp2-zero1"][0]
    for first, resumed in pp_losses["resume"]:
        assert sorted(first) == [1, 2] and sorted(resumed) == [3, 4, 5]
        assert {**first, **resumed} == full  # bitwise: same layer files, same optimizer state


# ---------------------------------------------------------------------------------- layout, config


def test_topology_pp_outermost_and_logging_rank():
    t = Topology(world_size=8, rank=6, tp=2, pp=2)
    assert (t.pp_rank, t.dp_rank, t.tp_rank) == (1, 1, 0)
    assert t.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert t.logging_rank == 4  # first rank of the last stage
    assert Topology(world_size=8, rank=0, tp=2).logging_rank == 0
    assert "pipelines" not in Topology(world_size=8, rank=0, tp=2).describe()
    ds = t.deepspeed_topology()  # asserts every rank's coordinates agree with ours
    assert ds.get_axis_comm_lists("pipe") == t.pp_groups()
    assert ds.get_axis_comm_lists("model") == t.tp_groups()


def test_make_logger_on_the_logging_rank_only():
    from trainer.loop import make_logger
    from trainer.metrics import NullLogger
    from trainer.session import Session

    cfg = _cfg(1, pp=2, world=2)
    assert type(make_logger(cfg, Session(rank=0, world_size=2), logging_rank=1)) is NullLogger
    assert type(make_logger(cfg, Session(rank=1, world_size=2), logging_rank=1)) is not NullLogger


def test_config_refuses_pp_with_zero3_too_many_stages_and_tied_embeddings():
    with pytest.raises(ConfigError, match=r"parallel.pp=2 needs parallel.zero_stage<=1"):
        _cfg(3, pp=2, world=2)
    with pytest.raises(ConfigError, match=r"parallel.pp \(8\) must be <= model.n_layers \(4\)"):
        _cfg(1, pp=8, world=8)
    with pytest.raises(ConfigError, match=r"model.tie_embeddings is not supported with parallel.pp=2"):
        _cfg(1, pp=2, world=2, model={"tie_embeddings": True})
