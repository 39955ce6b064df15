"""Non-finite steps and loss spikes (trainer/anomaly.py): a left-out step changes nothing, on ZeRO-3
dp2 and under PP; a window of samples that makes the loss non-finite is skipped and rolled back
over, and the run then trains exactly as one told to skip that window from the start; the skip list
keeps the global order layout-free.

The fault is a test-only patch of the loss, keyed on the identity corpus's sample ids (each sample
names itself), made from the test (in each spawned rank); nothing in the project knows of it.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from tests.data_fixtures import identity_corpus, sample_ids
from tests.run_fixtures import tiny_config
from tests.test_tensor_parallel import dp_batches, run_world
from trainer.data.stream import DataError, SkipList, TokenStream
from trainer.metrics import NullLogger
from trainer.session import Session

BLOCK = 9  # identity corpus blocks: seq_len 8
GB = 8


@pytest.fixture(scope="module")
def ids_corpus(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ids") / "corpus"
    identity_corpus(out, train_blocks=256, samples_per_shard=16, block_len=BLOCK)
    return str(out)


def _stream(corpus: str, dp_rank=0, dp=1, skip=()) -> TokenStream:
    from trainer.data.stream import open_manifest

    return TokenStream(
        corpus,
        open_manifest(corpus),
        seq_len=BLOCK - 1,
        micro_batch=2,
        global_batch=GB,
        dp_rank=dp_rank,
        dp_size=dp,
        seed=7,
        skip=skip,
    )


def _step_ids(stream: TokenStream, start: int, steps: int) -> list[list[int]]:
    """The sample ids of each step from `start`, over all DP ranks (this stream's rank only)."""
    per_step = GB // (stream.micro_batch * stream.dp_size)
    it = stream.batches(start)
    out = []
    for _ in range(steps):
        ids = []
        for _ in range(per_step):
            x, _ = next(it)
            ids += sample_ids(x, BLOCK)
        out.append(ids)
    it.close()
    return out


# ---------------------------------------------------------------------------------- the order


def test_skipped_ranges_leave_the_order_otherwise_as_it_was_on_any_layout(ids_corpus):
    plain = _step_ids(_stream(ids_corpus), 0, 12)
    skip = [(16, 24), (40, 56)]  # steps 2, 5 and 6 as counted without skips
    kept = [plain[u] for u in range(12) if u not in (2, 5, 6)]
    assert _step_ids(_stream(ids_corpus, skip=skip), 0, 9) == kept
    # dp=2: each rank's share of every kept step, the same global order
    halves = [_step_ids(_stream(ids_corpus, r, 2, skip), 0, 9) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*halves, strict=True)] == [sorted(s) for s in kept]
    # a resume at step 4 (= global batch 7) opens there, on either layout
    assert _step_ids(_stream(ids_corpus, skip=skip), 4, 5) == kept[4:]

    s = _stream(ids_corpus, skip=skip)
    state = s.state_dict(4)
    assert state["skipped_samples"] == [[16, 24], [40, 56]]
    fresh = _stream(ids_corpus)  # a restart without the config's ranges: the checkpoint's stay
    assert fresh.check_resume(state) == 4 and fresh.skip.ranges == state["skipped_samples"]
    # a range added before the checkpoint's position would change what was already trained on
    late = _stream(ids_corpus, skip=[(0, 8)])
    with pytest.raises(DataError, match=r"data.skip_samples .* before the checkpoint's position"):
        late.check_resume(_stream(ids_corpus).state_dict(4))


def test_a_mixture_leaves_the_same_global_batches_out(tmp_path):
    from tests.data_fixtures import identity_corpora
    from trainer.data.mixing import MixedStream, open_sources

    roots = identity_corpora(tmp_path, [20, 53], samples_per_shard=7)
    sources = [{"path": r, "weight": w} for r, w in zip(roots, (3, 1), strict=True)]
    cfg = tiny_config(data={"seq_len": BLOCK - 1, "sources": sources}, model={"max_seq_len": BLOCK - 1})

    def ids(skip=(), start=0, steps=9, dp=1):
        out = []
        for r in range(dp):
            s = MixedStream(
                open_sources(cfg),
                seq_len=BLOCK - 1,
                micro_batch=2,
                global_batch=GB,
                dp_rank=r,
                dp_size=dp,
                seed=0,
                skip=skip,
            )
            out.append(_step_ids(s, start, steps))
        return [sorted(sum(parts, [])) for parts in zip(*out, strict=True)]

    plain = ids(steps=12)
    skip = [(16, 24), (40, 56)]
    kept = [plain[u] for u in range(12) if u not in (2, 5, 6)]
    assert ids(skip) == ids(skip, dp=2) == kept
    assert ids(skip, start=4, steps=5) == kept[4:]
    mixed = MixedStream(
        open_sources(cfg), seq_len=BLOCK - 1, micro_batch=2, global_batch=GB, dp_rank=0, dp_size=1, seed=0
    )
    state = MixedStream(
        open_sources(cfg),
        seq_len=BLOCK - 1,
        micro_batch=2,
        global_batch=GB,
        dp_rank=0,
        dp_size=1,
        seed=0,
        skip=skip,
    ).state_dict(4)
    assert mixed.check_resume(state) == 4 and mixed.skip.ranges == [[16, 24], [40, 56]]


def test_skip_list_counts_steps_around_the_ranges():
    s = SkipList(8, [(40, 48), (16, 24), (48, 56)])
    assert s.ranges == [[16, 24], [40, 56]] and s.samples == 24
    assert [s.unskipped_step(k) for k in range(6)] == [0, 1, 3, 4, 7, 8]
    assert s.step_samples(4) == (56, 64)
    with pytest.raises(DataError, match="multiples of parallel.global_batch_size"):
        s.add(3, 8)


def test_skip_samples_config_is_checked():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.skip_samples: \[8, 12\]"):
        tiny_config(data={"skip_samples": [[8, 12]]})
    assert tiny_config(data={"skip_samples": [[8, 16]]}).data.skip_samples == [[8, 16]]


# ---------------------------------------------------------------------------------- the fault


@contextmanager
def poisoned_samples(ids: set[int], factor: float = float("nan"), block_len: int = BLOCK):
    """While active, the loss of a micro batch holding one of the sample ids `ids` is multiplied by
    `factor` (NaN: so are its gradients): a test-only patch of the loss the loop builds its engine with."""
    import trainer.loop as loop

    real = loop.cross_entropy

    def loss(logits, targets):
        out = real(logits, targets)
        hit = {(int(r[0]) - 2) // block_len for r in targets} & ids  # targets are inputs shifted by one
        return out * factor if hit else out

    loop.cross_entropy = loss
    try:
        yield
    finally:
        loop.cross_entropy = real


class Recorded(NullLogger):
    """The metrics the logging rank would send to MLflow."""

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def _run_cfg(corpus: str, train=None, **data):
    return tiny_config(
        model={"max_seq_len": BLOCK - 1},
        data={"path": corpus, "seq_len": BLOCK - 1, **data},
        parallel={"micro_batch_size": 4, "global_batch_size": GB},
        train={"steps": 9, "nonfinite_tolerance": 2, "seed": 7, **(train or {})},
        checkpoint={"every": 2, "keep": 2},
    )


@pytest.mark.slow
def test_a_nonfinite_window_is_rolled_back_over_and_trains_as_if_skipped_from_the_start(ids_corpus, tmp_path):
    from trainer.loop import train

    window = (40, 56)  # global batches 5 and 6: both poisoned, 2 = nonfinite_tolerance in a row
    ids = {i for step in _step_ids(_stream(ids_corpus), 5, 2) for i in step}
    sink = Recorded()
    (tmp_path / "hit").mkdir()
    (tmp_path / "told").mkdir()
    with poisoned_samples(ids):
        hit = train(_run_cfg(ids_corpus), Session(run_dir=str(tmp_path / "hit")), logger=sink)
    told = train(_run_cfg(ids_corpus, skip_samples=[list(window)]), Session(run_dir=str(tmp_path / "told")))

    assert hit.steps == told.steps == 9
    assert all(math.isfinite(v) for v in hit.losses.values())
    assert hit.losses == told.losses  # every step, the ones trained again after the rollback included
    events = [json.loads(line) for line in (tmp_path / "hit" / "events.jsonl").read_text().splitlines()]
    nonfinite = [e for e in events if e["event"] == "nonfinite_step"]
    assert [(e["step"], e["samples"]) for e in nonfinite] == [(5, [40, 48]), (5, [48, 56])]
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert (rollback["to_step"], rollback["skipped_samples"]) == (4, [list(window)])
    mine = ("nonfinite_steps", "skipped_samples", "skipped_from", "skipped_to")
    skipped = {k: v for _, m in sink.logged for k, v in m.items() if k in mine}
    assert skipped == {
        "nonfinite_steps": 2.0,
        "skipped_samples": 16.0,
        "skipped_from": 48.0,
        "skipped_to": 56.0,
    }
    # the run state keeps it: every later commit's data state, and the run's own file
    commit = json.loads((tmp_path / "hit" / "checkpoints" / "step_8" / "commit.json").read_text())
    assert commit["data"]["skipped_samples"] == [list(window)]
    assert json.loads((tmp_path / "hit" / "skipped_samples.json").read_text())["skipped_samples"] == [
        list(window)
    ]


@pytest.mark.slow
def test_a_restart_between_the_anomaly_and_the_next_commit_keeps_the_skip_list(ids_corpus, tmp_path):
    """The run stops at its rollback (train.max_rollbacks 0); the restart resumes at the commit of
    step 4 with the window from `<run>/skipped_samples.json`, then a second resume keeps it from the
    commit record; together they train as a run told to skip the window from the start."""
    from trainer.anomaly import DivergedError
    from trainer.loop import train

    ids = {i for step in _step_ids(_stream(ids_corpus), 5, 2) for i in step}
    cfg = _run_cfg(ids_corpus)
    run = Session(run_dir=str(tmp_path))
    with poisoned_samples(ids):  # the samples stay poisoned: the restarts must not read them
        with pytest.raises(DivergedError, match="train.max_rollbacks"):
            train(_run_cfg(ids_corpus, train={"max_rollbacks": 0}), run)
        first = train(replace(cfg, train=replace(cfg.train, stop_at=7)), run)
        second = train(cfg, run)
    told = train(_run_cfg(ids_corpus, skip_samples=[[40, 56]]), Session())
    assert (first.steps, second.steps) == (7, 9)
    resumed = {k: v for k, v in first.losses.items() if k > 4} | second.losses
    assert resumed == {k: v for k, v in told.losses.items() if k > 4}
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] in ("nonfinite_step", "rollback", "start")] == [
        "start",
        "nonfinite_step",
        "nonfinite_step",
        "start",  # the window is never read again
        "start",
    ]


@pytest.mark.slow
def test_a_loss_spike_is_rolled_back_over_with_its_window_skipped_and_the_lr_scaled(ids_corpus, tmp_path):
    from trainer.loop import train

    ids = {i for step in _step_ids(_stream(ids_corpus), 5, 1) for i in step}
    spike = {"spike": {"k": 50.0, "window": 3}, "rollback_lr_scale": 0.5, "rollback_lr_steps": 2}
    (tmp_path / "hit").mkdir()
    with poisoned_samples(ids, factor=100.0):  # 100x the loss: far past 50 deviations of a flat curve
        hit = train(_run_cfg(ids_corpus, train=spike), Session(run_dir=str(tmp_path / "hit")))
    told = train(_run_cfg(ids_corpus, skip_samples=[[40, 48]]), Session())
    events = [json.loads(line) for line in (tmp_path / "hit" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "loss_spike"] == [5]
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert (rollback["to_step"], rollback["skipped_samples"]) == (4, [[40, 48]])
    assert {k: v for k, v in hit.losses.items() if k <= 5} == {k: v for k, v in told.losses.items() if k <= 5}
    # steps 4 and 5 were trained again at half the LR: from there on the runs differ
    assert hit.losses[6] != told.losses[6] and all(math.isfinite(v) for v in hit.losses.values())


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_a_nonfinite_gradient_with_a_finite_loss_leaves_the_step_out(zero_stage):
    """The check reads the reduced gradients wherever the ZeRO stage keeps them."""
    from contextlib import ExitStack

    from tests.test_loop import affine_stream
    from trainer import loop

    cfg = tiny_config(model={"vocab_size": 64}, parallel={"zero_stage": zero_stage})
    with ExitStack() as cleanup:
        t = loop.build(cfg, Session(), cleanup, batches=affine_stream(0, 4))
        hook = next(t.engine.module.parameters()).register_hook(lambda g: g * float("nan"))
        losses = loop.train_step(t, 0, t.next_micro_batches()[0])
        assert math.isfinite(float(sum(losses)))
        assert (t.anomaly.verdict, t.engine.global_steps) == ("nonfinite", 0)
        hook.remove()
        loop.train_step(t, 0, t.next_micro_batches()[0])
        assert (t.anomaly.verdict, t.engine.global_steps) == ("ok", 1)


# ---------------------------------------------------------------------------------- a left-out step, multi-rank

V = 64
POISON_STEP = 2
CASES = {"dp2-zero3": (3, 1), "pp2-zero1": (1, 2)}  # name -> (zero stage, pp)


def _case_cfg(zero_stage: int, pp: int):
    return tiny_config(
        model={"vocab_size": V, "n_layers": 2},
        parallel={"zero_stage": zero_stage, "pp": pp, "micro_batch_size": 2, "global_batch_size": 8},
        optim={"lr": 1e-2, "warmup_steps": 2},
        train={"steps": 5},
        cluster={"num_workers": 2},
    )


def _snapshot(t) -> list[torch.Tensor]:
    """Every tensor of this rank's training state: weights (ZeRO-3: its partitions), the optimizer's
    fp32 masters and moments."""
    base = getattr(t.optimizer, "optimizer", t.optimizer)
    out = [getattr(p, "ds_tensor", p).detach().clone() for p in t.engine.module.parameters()]
    out += [p.detach().clone() for g in base.param_groups for p in g["params"]]
    out += [v.clone() for st in base.state.values() for v in st.values() if torch.is_tensor(v)]
    return out


def _left_out_step(rank: int, world: int) -> dict:
    return {name: _one_case(name, rank, world) for name in CASES}


def _one_case(name: str, rank: int, world: int) -> tuple:
    """(state unchanged by the poisoned step, step counts unchanged, losses, losses of a run
    without the poisoned batch, (step, LR, verdict) of each train_step call) on this rank."""
    import trainer.loop as loop
    from trainer.parallel.topology import Topology

    zero_stage, pp = CASES[name]
    cfg = _case_cfg(zero_stage, pp)
    topo = Topology(world, rank, 1, pp)
    p = cfg.parallel
    per_step = p.global_batch_size // (p.micro_batch_size * topo.dp)

    def batches(drop: bool):
        every = dp_batches(0, topo.dp_rank, topo.dp, p.micro_batch_size, p.global_batch_size)
        return (b for i, b in enumerate(every) if not (drop and i // per_step == POISON_STEP))

    real_loss, real_step = loop.cross_entropy, loop.train_step
    poisoned, seen, unchanged = [False], [], []

    def loss(logits, targets):  # NaN while the poisoned step runs (built into the pipeline too)
        out = real_loss(logits, targets)
        return out * float("nan") if poisoned[0] else out

    def watched(t, step, micro):
        poisoned[0] = len(seen) == POISON_STEP
        before = (_snapshot(t), t.engine.global_steps, t.engine.global_samples)
        result = real_step(t, step, micro)
        seen.append((step, t.optimizer.param_groups[0]["lr"], t.anomaly.verdict))
        if poisoned[0]:
            after = (_snapshot(t), t.engine.global_steps, t.engine.global_samples)
            unchanged.append(all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True)))
            unchanged.append(before[1:] == after[1:])
            poisoned[0] = False
        return result

    session = Session(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    loop.cross_entropy, loop.train_step = loss, watched
    try:
        hit = loop.train(cfg, session, batches=batches(False))
    finally:
        loop.cross_entropy, loop.train_step = real_loss, real_step
    told = loop.train(cfg, session, batches=batches(True))
    return (*unchanged, hit.losses, told.losses, seen)


@pytest.mark.slow
def test_a_left_out_step_changes_nothing_on_zero3_dp2_and_under_pp(tmp_path):
    per_rank = run_world(2, tmp_path, _left_out_step)
    for name in CASES:
        for r in per_rank:
            same_state, same_counts, hit, told, seen = r[name]
            assert same_state and same_counts, name  # weights, optimizer state, step and sample counts
            # the poisoned step is trained again at the same step number, so at the same LR
            assert [s[0] for s in seen] == [0, 1, 2, 2, 3, 4], name
            assert seen[2][1:] == (seen[3][1], "nonfinite") and seen[3][2] == "ok", name
            assert hit == told, name  # and from there on exactly as without the poisoned batch


@pytest.mark.slow
def test_the_benchmark_measures_the_check_and_the_recovery():
    """benchmarks/resilience_nan.py's two figures, on its real path, shortened."""
    from benchmarks.resilience_nan import check_cost, recovery_seconds

    cost = check_cost(rounds=1, steps=1)
    assert cost["step_s_with_check"] > 0 and cost["step_s_without"] > 0 and 0 < cost["check_share"] < 1
    rec = recovery_seconds()
    assert rec["seconds_past_window"] > rec["plain_step_s"] > 0
