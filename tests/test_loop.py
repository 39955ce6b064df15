"""The loop as one plain process (no Ray): DeepSpeed ZeRO-3 on a gloo world of 1."""

import math

import torch

from tests.run_fixtures import tiny_config
from trainer.loop import train

V, T = 64, 32


def affine_stream(seed: int, batch: int = 4):
    """Sequences x[t+1] = (5 x[t] + 3) mod V from a random start: each token is uniform on its own
    (entropy ln V) but fully determined by its predecessor, so a model that learns the rule
    approaches loss ln(V) / T (only the first target is unpredictable)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        seq = torch.empty(batch, T + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, V, (batch,), generator=g)
        for t in range(T):
            seq[:, t + 1] = (5 * seq[:, t] + 3) % V
        yield seq[:, :-1], seq[:, 1:]


def _cfg(steps=30):
    return tiny_config(model={"vocab_size": V}, train={"steps": steps}, optim={"lr": 1e-2, "warmup_steps": 3})


def test_thirty_steps_learn_the_rule():
    result = train(_cfg(), batches=affine_stream(0))
    first, last = result.losses[1], result.losses[30]
    assert abs(first - math.log(V)) < 0.3  # starts at chance
    # Halfway from chance to the achievable floor ln(V)/T: only context-use gets there.
    assert last < 0.5 * math.log(V), result.losses


def test_same_seed_same_losses():
    a = train(_cfg(steps=8), batches=affine_stream(1))
    b = train(_cfg(steps=8), batches=affine_stream(1))
    assert a.losses == b.losses
    c = train(tiny_config(model={"vocab_size": V}, train={"steps": 8, "seed": 99}), batches=affine_stream(1))
    assert c.losses != a.losses


def test_garbage_is_collected_at_the_scheduled_steps_only():
    """With `train.gc_every: 3`, Python's collector runs at steps 3 and 6 (full collections, the
    same steps on every rank) and nowhere else once the first step is done: a rank's automatic
    collections would otherwise land mid-step, each rank at its own moment. Each one's pause is
    logged as `gc_s` at its step; the process gets its collector back afterwards."""
    import gc

    from trainer.metrics import NullLogger

    timeline: list[str] = []
    logged: dict[int, dict] = {}

    class Capture(NullLogger):
        def log(self, metrics, step):
            logged.setdefault(step, {}).update(metrics)
            if step == 7:
                timeline.append("step 7 logged")  # the last step is over

    def batches():  # one micro batch per step (global batch 4 = micro batch 4, one rank)
        for i, batch in enumerate(affine_stream(2), start=1):
            timeline.append(f"step {i}")
            yield batch

    def on_gc(phase, info):
        if phase == "stop":
            timeline.append(f"gc gen{info['generation']}")

    cfg = tiny_config(
        model={"vocab_size": V}, parallel={"global_batch_size": 4}, train={"steps": 7, "gc_every": 3}
    )
    gc.callbacks.append(on_gc)
    try:
        result = train(cfg, batches=batches(), logger=Capture())
    finally:
        gc.callbacks.remove(on_gc)
    after_first_step = timeline[timeline.index("step 2") : timeline.index("step 7 logged")]
    assert after_first_step == [
        "step 2",
        "step 3",
        "gc gen2",
        "step 4",
        "step 5",
        "step 6",
        "gc gen2",
        "step 7",
    ], after_first_step
    assert sorted(result.losses) == list(range(1, 8))
    assert [s for s in sorted(logged) if "gc_s" in logged[s]] == [3, 6]
    assert all(logged[s]["gc_s"] > 0 for s in (3, 6))
    assert gc.isenabled() and gc.get_freeze_count() == 0
