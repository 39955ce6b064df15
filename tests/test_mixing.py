"""A weighted mixture of prepared corpora (`data.sources`): each source's share at every point of the
stream, exact resume (random steps, mid-shard, another DP size), sources that run out, a tiny
training run logging tokens per source to MLflow, and the bad-input messages."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.data_fixtures import identity_corpora, sample_ids
from tests.run_fixtures import run_pretrain, tiny_config, tiny_run
from trainer.config import ConfigError, SourceConfig, from_dict, mix_weights
from trainer.data.mixing import MixedStream, MixSchedule, corpus_stream, open_sources
from trainer.data.stream import DataError, open_manifest

BLOCK = 9  # identity corpora: 8 tokens a sample plus the shifted target
GB = 12  # global batch: divisible by micro batch 3 x dp 1, 2 and 4
SMALL, LARGE, OTHER = 20, 53, 13  # train blocks; 7 a shard, so most steps start mid-shard


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three sources with one tokenizer: a small one (runs out often), a large one, another small one."""
    return identity_corpora(tmp_path_factory.mktemp("mix"), [SMALL, LARGE, OTHER], samples_per_shard=7)


@pytest.fixture(scope="module")
def roots(corpora):
    return corpora[:2]


def _cfg(sources: list[dict], **data):
    return tiny_config(
        data={"seq_len": BLOCK - 1, "sources": sources, **data},
        model={"max_seq_len": BLOCK - 1},
        parallel={"micro_batch_size": 3, "global_batch_size": GB},
    )


def _stream(roots, weights=(3, 1), dp_rank=0, dp=1, seed=0, workers=0) -> MixedStream:
    cfg = _cfg([{"path": r, "weight": w} for r, w in zip(roots, weights, strict=True)])
    return MixedStream(
        open_sources(cfg),
        seq_len=BLOCK - 1,
        micro_batch=3,
        global_batch=GB,
        dp_rank=dp_rank,
        dp_size=dp,
        seed=seed,
        workers=workers,
    )


def _steps(stream: MixedStream, start: int, n: int) -> list[torch.Tensor]:
    """(GB/dp, seq_len) inputs of this rank for steps start .. start+n-1."""
    per_step = GB // (3 * stream.dp_size)
    it = stream.batches(start)
    return [torch.cat([next(it)[0] for _ in range(per_step)]) for _ in range(n)]


def _global_steps(roots, start: int, n: int, dp: int, state: dict | None = None, **kw) -> list[torch.Tensor]:
    """The (GB, seq_len) global batches of steps start.., gathered from `dp` ranks (sample g from rank
    g % dp), each rank resumed from `state` when given."""
    per_rank = []
    for r in range(dp):
        s = _stream(roots, dp_rank=r, dp=dp, **kw)
        first = s.check_resume(state) if state is not None else start
        per_rank.append(_steps(s, first, n))
    out = []
    for i in range(n):
        rows = torch.empty(GB, BLOCK - 1, dtype=torch.int64)
        for r in range(dp):
            rows[r::dp] = per_rank[r][i]
        out.append(rows)
    return out


# ---------------------------------------------------------------------------------------- shares


@pytest.mark.parametrize("trial", range(40))
def test_each_source_is_within_one_sample_of_its_share_at_every_point(trial):
    rng = random.Random(trial)
    k = rng.randint(1, 6)
    weights = [
        rng.choice([rng.randint(1, 9), round(rng.uniform(0.01, 5), rng.randint(1, 3))]) for _ in range(k)
    ]
    schedule = MixSchedule(mix_weights([SourceConfig(path="x", weight=w) for w in weights]))
    n = 3 * schedule.period + 5
    g = np.arange(n)
    src, idx = schedule.at(g)
    counts = np.zeros((n + 1, k), dtype=np.int64)  # counted the slow way, sample by sample
    counts[1:] = np.cumsum(np.eye(k, dtype=np.int64)[src], axis=0)
    target = np.arange(n + 1)[:, None] * np.asarray(weights)[None, :] / sum(weights)
    assert np.abs(counts - target).max() < 1, weights
    assert (idx == counts[g, src]).all()  # a sample's index in its source = that source's count before it
    for p in (0, 1, schedule.period - 1, n, 10**12 + 7):  # the closed form, far beyond any replay
        want = counts[p] if p <= n else None
        got = schedule.counts(p)
        assert got.sum() == p and np.abs(got - p * np.asarray(weights) / sum(weights)).max() < 1
        if want is not None:
            assert (got == want).all()


def test_batches_hold_each_source_in_its_share(roots):
    """Counted on the tokens a rank receives: every step of weights 3:1 holds 9 and 3 samples."""
    boundary = (SMALL + 2) * BLOCK  # identity ids below it are the small source's
    for batch in _steps(_stream(roots), 0, 12):
        small = int((batch[:, 0] <= boundary).sum())
        assert (small, GB - small) == (9, 3)


# ---------------------------------------------------------------------------------------- resume


def test_resume_at_random_steps_and_on_other_dp_sizes_gives_the_uninterrupted_batches(roots):
    uninterrupted = _global_steps(roots, 0, 30, dp=1)
    full = _stream(roots)
    rng = random.Random(0)
    # Random steps at which both sources resume inside a shard (at row t > 0 of it).
    inside = [
        s
        for s in range(1, 27)
        if all(o.locate(n)[3] for o, n in zip(full.orders, (9 * s, 3 * s), strict=True))
    ]
    steps = sorted(rng.sample(inside, 4))
    for step in steps:
        used = full.state_dict(step)["samples_used"]
        assert used == {"src0": 9 * step, "src1": 3 * step}
        for dp, workers in ((1, 0), (2, 0), (4, 2)):
            got = _global_steps(roots, step, 3, dp=dp, state=full.state_dict(step), workers=workers)
            for i, batch in enumerate(got):
                assert torch.equal(batch, uninterrupted[step + i]), (step, dp, i)

    # Far into training (millions of epochs of each source) a resume is a lookup, on any DP size.
    far = 10**9 + 7
    assert full.state_dict(far)["samples_used"] == {"src0": 9 * far, "src1": 3 * far}
    alone = _global_steps(roots, far, 2, dp=1)
    spread = _global_steps(roots, far, 2, dp=4, state=full.state_dict(far))
    assert all(torch.equal(a, b) for a, b in zip(alone, spread, strict=True))


def test_reader_threads_do_not_change_the_batches(roots):
    inline = _steps(_stream(roots), 3, 10)
    for workers in (1, 3):
        threaded = _steps(_stream(roots, workers=workers), 3, 10)
        assert all(torch.equal(a, b) for a, b in zip(inline, threaded, strict=True))


def test_resume_on_another_mixture_is_refused_unless_forced(roots):
    state = _stream(roots).state_dict(5)
    other = _stream(roots, weights=(1, 1))
    with pytest.raises(DataError, match=r"data mixture.*weight") as e:
        other.check_resume(state)
    assert e.value.field == "data.sources"
    assert other.check_resume(state, force=True) == 5
    with pytest.raises(DataError, match="seed"):
        _stream(roots, seed=1).check_resume(state)


# ---------------------------------------------------------------------------------------- epochs


def test_a_source_that_runs_out_repeats_in_a_new_order_without_disturbing_the_other(roots, corpora):
    stream = _stream(roots)
    steps = 12  # 108 samples of the small source: 5 epochs of its 20
    ids = [sample_ids(b, BLOCK) for b in _steps(stream, 0, steps)]
    small = [i for step in ids for i in step if i < SMALL + 2]
    epochs = [small[e * SMALL : (e + 1) * SMALL] for e in range(len(small) // SMALL)]
    assert len(epochs) == 5
    for epoch in epochs:
        assert sorted(epoch) == list(range(SMALL))  # every sample once per epoch
    assert len({tuple(e) for e in epochs}) == 5  # each epoch its own order

    # The large source's samples do not depend on the other source: another small corpus in its
    # place (another size, so it runs out at other points) leaves them where they were.
    large_ids = range(SMALL + 2, SMALL + LARGE + 4)
    large = [i for step in ids for i in step if i in large_ids]
    their_ids = [sample_ids(b, BLOCK) for b in _steps(_stream([corpora[2], roots[1]]), 0, steps)]
    theirs = [i for step in their_ids for i in step if i in large_ids]
    assert len(large) == 3 * steps and large == theirs
    assert any(
        i not in large_ids for step in their_ids for i in step if i >= SMALL + 2
    )  # the other small one


# ---------------------------------------------------------------------------------------- bad input


def test_bad_weights_names_and_paths_are_refused_by_the_config(roots):
    a, b = roots
    cases = [
        (
            [{"path": a, "weight": 1}, {"path": b, "weight": 0}],
            "data.sources[1].weight",
            "must be > 0, got 0",
        ),
        ([{"path": a, "weight": -2}], "data.sources[0].weight", "must be > 0"),
        ([{"path": a}, {"path": a + "/"}], "data.sources[1].name", "like another source"),
        ([{"path": a, "name": "web@2024"}], "data.sources[0].name", "metric name cannot hold"),
        ([{"path": a, "wieght": 1}], "data.sources[0].wieght", "unknown key"),
        ([{"path": a, "weight": 0.1234567}, {"path": b}], "data.sources", "round them"),
    ]
    for sources, field, text in cases:
        with pytest.raises(ConfigError, match=text) as e:
            _cfg(sources)
        assert e.value.field == field and field in str(e.value)
    with pytest.raises(ConfigError, match="must be one of data.sources") as e:
        _cfg([{"path": a}], path=b)
    assert e.value.field == "data.path"
    assert _cfg([{"path": a}, {"path": b, "weight": 2}]).data.path == a  # the first source by default
    assert _cfg([{"path": a}, {"path": b}], path="").data.path == a


def test_a_mixture_config_is_made_absolute_and_reloads_from_the_run(tmp_path, monkeypatch):
    """What the driver does before workers see it: relative paths made absolute (data.path staying
    one of the sources), then config.yaml written and read back by the workers."""
    from cluster.driver import absolutize
    from trainer.config import load_config, save_config

    monkeypatch.chdir(tmp_path)
    yaml_file = tmp_path / "mix.yaml"
    yaml_file.write_text(
        "data:\n  sources:\n    - {path: web, weight: 0.7}\n    - {path: code, weight: 0.3}\n"
    )
    cfg = absolutize(load_config(yaml_file, ["data.seq_len=8"]))
    assert [s.path for s in cfg.data.sources] == [str(tmp_path / "web"), str(tmp_path / "code")]
    assert cfg.data.path == str(tmp_path / "web")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_missing_source_and_another_tokenizer_name_the_source(roots, tmp_path):
    a, _ = roots
    with pytest.raises(DataError, match=r"data.sources\[1\] \(nowhere\).*manifest.json not found") as e:
        open_sources(_cfg([{"path": a}, {"path": str(tmp_path / "nowhere")}]))
    assert e.value.field == "data.sources[1].path"
    alien = identity_corpora(tmp_path / "alien", [30], samples_per_shard=7)[0]  # its own tokenizer
    with pytest.raises(DataError, match=r"data.sources\[1\] \(src0x at .*alien.*another tokenizer") as e:
        open_sources(_cfg([{"path": a}, {"path": alien, "name": "src0x"}]))
    assert "data.sources[0] (src0 at" in str(e.value) and e.value.field == "data.sources[1].path"


def test_cli_refuses_a_missing_source_before_anything_starts(roots, tmp_path):
    a, _ = roots
    missing = tmp_path / "gone"
    sources = f"data.sources=[{{path: {a}, weight: 3}}, {{path: {missing}, weight: 1}}]"
    args = tiny_run(a, tmp_path, "mix-missing", 2, sources, "data.seq_len=8", "model.max_seq_len=8")
    proc = run_pretrain(
        "train", "configs/tiny-cpu.yaml", *[x for o in args for x in ("--set", o)], timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.sources[1] (gone)" in last and "manifest.json not found" in last
    assert not (tmp_path / "runs" / "mix-missing").exists()


# ---------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_tiny_run_on_two_sources_logs_tokens_per_source_and_resumes_exactly(roots, tmp_path):
    from mlflow.tracking import MlflowClient

    from cluster.tracking import create_mlflow_run
    from trainer.loop import train
    from trainer.session import Session

    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def cfg(**train_):
        sources = [{"path": roots[0], "weight": 3}, {"path": roots[1], "name": "big"}]
        return tiny_config(
            data={"seq_len": BLOCK - 1, "sources": sources},
            model={"max_seq_len": BLOCK - 1},
            parallel={"micro_batch_size": 3, "global_batch_size": GB},
            train={"steps": 4, "log_every": 2, **train_},
            tracking={"enabled": True, "uri": uri},
            cluster={"run_name": "mix"},
        )

    run_id = create_mlflow_run(cfg(), tmp_path / "run")
    result = train(cfg(), Session(mlflow_run_id=run_id))
    assert sorted(result.losses) == [1, 2, 4] and all(np.isfinite(list(result.losses.values())))
    client = MlflowClient(uri)
    assert client.get_run(run_id).data.params["data.sources.1.name"] == "big"
    small = {m.step: m.value for m in client.get_metric_history(run_id, "tokens/src0")}
    big = {m.step: m.value for m in client.get_metric_history(run_id, "tokens/big")}
    per_step = (BLOCK - 1) * np.array([9, 3])  # tokens of each source in one step of 12 samples
    # Windows: step 1 (the first), steps 2, steps 3-4.
    assert small == {1: per_step[0], 2: per_step[0], 4: 2 * per_step[0]}
    assert big == {1: per_step[1], 2: per_step[1], 4: 2 * per_step[1]}

    # Stopped at step 2 with a committed checkpoint, resumed from it: the same losses.
    run_dir = str(tmp_path / "resumed")
    first = train(cfg(stop_at=2), Session(run_dir=run_dir))
    second = train(cfg(), Session(run_dir=run_dir))
    assert first.losses == pytest.approx({k: result.losses[k] for k in (1, 2)}, abs=1e-6)
    assert sorted(second.losses) == [3, 4]
    assert (second.losses[3] + second.losses[4]) / 2 == pytest.approx(result.losses[4], abs=1e-6)


def test_single_corpus_stream_is_unchanged(roots):
    """`data.path` alone still gives the one-corpus stream."""
    cfg = tiny_config(data={"path": roots[0], "seq_len": BLOCK - 1}, model={"max_seq_len": BLOCK - 1})
    stream = corpus_stream(cfg, open_manifest(roots[0]), 0, 1)
    assert not isinstance(stream, MixedStream) and "epoch" in stream.state_dict(0)
    assert from_dict({"data": {"path": roots[0]}}).data.sources == []
