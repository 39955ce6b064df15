"""Resume on a different layout. A dp2 ZeRO-3 run on the real corpus commits step 3 and stops; copies
of it continue to step 6 on dp1, dp4, tp2 x dp2 (ZeRO-3) and pp2 x dp2 (ZeRO-1), the checkpoint
converted on the way (trainer/checkpoint/reshard.py). Global batch 8 throughout: the accumulation adapts.

Each resumed layout's losses must equal the uninterrupted dp2 run's: step 4 within 1e-6 (the
same weights on the same global batch; only the summation order differs), steps 5 and 6 within
1e-5 (the converted Adam moments and step count drive them). A repeated or skipped sample, or a
moment lost in the conversion, moves these losses by orders of magnitude more.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.run_fixtures import tiny_config
from tests.test_tensor_parallel import run_world

STEPS, STOP = 6, 3

# name -> (world, zero stage, tp, pp, micro batch)
RESUMED = {
    "dp1": (1, 3, 1, 1, 4),
    "dp4": (4, 3, 1, 1, 2),
    "tp2xdp2": (4, 3, 2, 1, 4),
    "pp2xdp2": (4, 1, 1, 2, 2),
}


def _cfg(corpus: str, world: int, zero_stage: int = 3, tp: int = 1, pp: int = 1, micro: int = 4, **train):
    return tiny_config(
        data={"path": corpus},
        parallel={
            "zero_stage": zero_stage,
            "tp": tp,
            "pp": pp,
            "micro_batch_size": micro,
            "global_batch_size": 8,
        },
        train={"steps": STEPS, **train},
        checkpoint={"every": STOP},
        cluster={"num_workers": world},
    )


def _session(rank: int, world: int, run_dir: str = ""):
    from trainer.session import Session

    return Session(rank=rank, world_size=world, local_rank=rank, local_world_size=world, run_dir=run_dir)


def _dp2(rank: int, world: int, corpus: str, full_dir: str, stopped_dir: str) -> tuple[dict, dict]:
    from trainer.loop import train

    full = train(_cfg(corpus, world), _session(rank, world, full_dir)).losses
    first = train(_cfg(corpus, world, stop_at=STOP), _session(rank, world, stopped_dir)).losses
    return full, first


def _resume(rank: int, world: int, corpus: str, runs: dict[str, str]) -> dict[str, dict]:
    from trainer.loop import train

    out = {}
    for name, run_dir in runs.items():
        _, zero_stage, tp, pp, micro = RESUMED[name]
        out[name] = train(
            _cfg(corpus, world, zero_stage, tp, pp, micro), _session(rank, world, run_dir)
        ).losses
    return out


@pytest.fixture(scope="module")
def dp2_runs(corpus, tmp_path_factory):
    """(uninterrupted losses, losses to the stop, the stopped run's directory)."""
    full_dir, stopped = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("stopped")
    (full, first), _ = run_world(2, tmp_path_factory.mktemp("w2"), _dp2, corpus, str(full_dir), str(stopped))
    assert sorted(first) == [1, 2, 3] and sorted(full) == list(range(1, STEPS + 1))
    return full, stopped


def _copy(stopped, tmp_path, name: str) -> str:
    dest = tmp_path / name
    shutil.copytree(stopped, dest)
    return str(dest)


def _assert_continues(full: dict, resumed: dict) -> None:
    assert sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    assert abs(resumed[STOP + 1] - full[STOP + 1]) < 1e-6, (resumed, full)
    for step in range(STOP + 2, STEPS + 1):
        assert abs(resumed[step] - full[step]) < 1e-5, (step, resumed, full)


def test_dp2_zero3_resumes_on_dp1(corpus, dp2_runs, tmp_path):
    from trainer.loop import train

    full, stopped = dp2_runs
    run_dir = _copy(stopped, tmp_path, "dp1")
    # A conversion left damaged by an earlier attempt is not trusted: it is redone.
    universal = tmp_path / "dp1" / "checkpoints" / f"step_{STOP}" / "universal"
    universal.mkdir()
    (universal / "universal.json").write_text(json.dumps({"adam_step": 99, "files": {"param.pt": "0" * 64}}))
    resumed = train(_cfg(corpus, 1, micro=4), _session(0, 1, run_dir)).losses  # accumulation 1 -> 2
    _assert_continues(full, resumed)
    converted = json.loads((universal / "universal.json").read_text())
    assert converted["adam_step"] == STOP and converted["source_layout"]["dp"] == 2
    assert sorted(converted["files"]) == ["exp_avg.pt", "exp_avg_sq.pt", "param.pt"]


def test_dp2_zero3_resumes_on_dp4_tp2_and_pp2(corpus, dp2_runs, tmp_path):
    full, stopped = dp2_runs
    runs = {name: _copy(stopped, tmp_path, name) for name in ("dp4", "tp2xdp2", "pp2xdp2")}
    (tmp_path / "w4").mkdir()
    per_rank = run_world(4, tmp_path / "w4", _resume, corpus, runs)
    for name in runs:
        # Every rank runs the loop; the logging rank (under PP the last stage's) has the losses.
        resumed = next(r[name] for r in reversed(per_rank) if r[name])
        _assert_continues(full, resumed)


def test_zero3_to_plain_zero0_and_on_to_zero2(corpus, dp2_runs, tmp_path):
    """ZeRO-0 on both sides of a conversion: its parameters and torch optimizer state are set
    directly, and read back by name when the next resume converts again."""
    from trainer.loop import train

    full, stopped = dp2_runs
    run_dir = _copy(stopped, tmp_path, "zero0")
    to_5 = train(_cfg(corpus, 1, zero_stage=0, stop_at=5), _session(0, 1, run_dir)).losses
    to_6 = train(_cfg(corpus, 1, zero_stage=2), _session(0, 1, run_dir)).losses
    _assert_continues(full, {**to_5, **to_6})
