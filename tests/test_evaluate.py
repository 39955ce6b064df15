"""Validation loss: the same sequences and the same value in every layout (same weights)."""

import pytest

from tests.run_fixtures import tiny_config
from tests.test_tensor_parallel import run_world
from trainer.loop import train
from trainer.session import Session

EVAL = {"eval_batches": 2, "eval_every": 2, "steps": 4}


def _cfg(corpus, world=1, **parallel):
    return tiny_config(
        data={"path": corpus},
        train=EVAL,
        parallel={"zero_stage": 1, **parallel},
        cluster={"num_workers": world},
        model={"vocab_size": 512},
    )


def _rank(rank, world, corpus, parallel):
    return train(
        _cfg(corpus, world, **parallel),
        Session(rank=rank, world_size=world, local_rank=rank, local_world_size=world),
    ).val_losses


def test_val_loss_logged_at_eval_steps(corpus):
    result = train(_cfg(corpus))
    assert sorted(result.val_losses) == [2, 4]
    assert all(0 < v < 10 for v in result.val_losses.values())


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{}, {"tp": 2}], ids=["dp2", "tp2"])
def test_val_loss_equal_across_layouts(corpus, tmp_path, parallel):
    single = train(_cfg(corpus)).val_losses
    ranks = run_world(2, tmp_path, _rank, corpus, parallel)
    for got in ranks:  # every rank reports the same value
        assert got == pytest.approx(single, abs=1e-5)


@pytest.mark.slow
def test_val_loss_equal_under_pipeline(corpus, tmp_path):
    cfg = {"model": {"vocab_size": 512, "n_layers": 2}}
    single = train(
        tiny_config(data={"path": corpus}, train=EVAL, parallel={"zero_stage": 1}, **cfg)
    ).val_losses
    ranks = run_world(2, tmp_path, _rank, corpus, {"pp": 2})
    for got in ranks:
        assert got == pytest.approx(single, abs=1e-5)
