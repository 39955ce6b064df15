"""Elastic worker groups (`cluster.min_workers`): which group sizes a run may take, and how many
workers the live nodes hold now.

A run whose group is lost goes on at the largest valid size the cluster holds (DP shrinks; TP, PP
and the global batch stay, gradient accumulation adapts; with `cluster.elastic_model_parallel` TP
and PP may go down to divisors of theirs where no size fits otherwise), and grows back at a commit
once the nodes return. A size is valid when it is a multiple of tp*pp whose dp divides the global
batch (in micro batches) and the data streams: then the data order is the full-size run's,
whatever the size. Ray
Train's elastic policy (cluster/library_internals.py) asks `GroupSizes.now()` for the size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cluster.capacity import alive_nodes, fits_on, worker_resources
from trainer.config import Config

log = logging.getLogger("pretrain")
GROW_KEY = "elastic_grow_to"  # a report's metric: the workers wait at a commit for a larger group


def elastic(cfg: Config) -> bool:
    """Whether the run may change its group size (0 < min_workers < num_workers)."""
    return 0 < cfg.cluster.min_workers < cfg.cluster.num_workers


def valid_layouts(cfg: Config, num_streams: int) -> dict[int, tuple[int, int]]:
    """{group size: (tp, pp)} from num_workers down to min_workers (0: num_workers only), largest
    first: the sizes with a layout that keeps the global batch and the data order. The run's own
    TP/PP where they fit; with `cluster.elastic_model_parallel`, else the largest TP*PP among the
    divisors of theirs (so the model's heads and layers still divide)."""
    cl, p = cfg.cluster, cfg.parallel
    divisors = [(t, q) for t in _divisors(p.tp) for q in _divisors(p.pp)]
    choices = sorted(divisors, key=lambda d: (d[0] * d[1], d[0]), reverse=True)
    if not cl.elastic_model_parallel:
        choices = [(p.tp, p.pp)]
    out = {}
    for n in range(cl.num_workers, (cl.min_workers or cl.num_workers) - 1, -1):
        for tp, pp in choices:
            dp = n // (tp * pp)
            if (
                n % (tp * pp) == 0
                and p.global_batch_size % (p.micro_batch_size * dp) == 0
                and num_streams % dp == 0
            ):
                out[n] = (tp, pp)
                break
    return out


def valid_sizes(cfg: Config, num_streams: int) -> list[int]:
    """The group sizes of `valid_layouts`, largest first."""
    return list(valid_layouts(cfg, num_streams))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def at_size(cfg: Config, layouts: dict, world_size: int) -> Config:
    """The run's config for a group of `world_size` workers: its TP/PP from `layouts` (as the
    driver computed them; JSON keys are strings)."""
    from dataclasses import replace

    tp, pp = layouts.get(str(world_size)) or (cfg.parallel.tp, cfg.parallel.pp)
    if (tp, pp) == (cfg.parallel.tp, cfg.parallel.pp):
        return cfg
    log.info(
        "elastic: %d workers train with tp=%d, pp=%d (the run's: tp=%d, pp=%d)",
        world_size,
        tp,
        pp,
        cfg.parallel.tp,
        cfg.parallel.pp,
    )
    return replace(cfg, parallel=replace(cfg.parallel, tp=tp, pp=pp))


def workers_held(cfg: Config, need: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers of `need` the nodes hold under `cluster.placement_strategy`."""
    per_node = [fits_on(node, need) for node in nodes]
    strategy = cfg.cluster.placement_strategy
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for k in per_node if k)
    return sum(per_node)


@dataclass
class GroupSizes:
    """The run's valid group sizes and what one worker needs; `now()` is the largest size the live
    nodes of the connected Ray cluster hold (0 when not even the smallest fits)."""

    cfg: Config
    sizes: list[int]
    use_gpu: bool

    def now(self) -> int:
        import ray

        held = workers_held(self.cfg, worker_resources(self.cfg, self.use_gpu), alive_nodes(ray))
        return next((n for n in self.sizes if n <= held), 0)


# How long workers wait at a commit for the group to be resized before they train on (the policy
# resizes within a poll of the controller, seconds; this only guards against a run that waits forever).
GROW_WAIT_S = 300.0


class GrowAtCommit:
    """Worker side, at every commit of an elastic run below its full size: rank 0 asks, at most
    every `cluster.elastic_check_s`, whether the live nodes hold a larger valid group; if they do,
    every rank reports it to Ray Train and waits there, at the commit, for the controller to end
    this group and start the larger one, which resumes from this commit (no step lost)."""

    def __init__(self, sizes: GroupSizes, world_size: int, rank: int):
        self.sizes, self.world_size, self.rank = sizes, world_size, rank
        self.checked = time.monotonic()  # the group's start: the cluster was just sized

    def at_commit(self, step: int) -> None:
        import ray.train
        from ray.train.collective import broadcast_from_rank_zero

        if self.world_size >= self.sizes.cfg.cluster.num_workers:
            return
        larger = 0
        if self.rank == 0 and time.monotonic() - self.checked >= self.sizes.cfg.cluster.elastic_check_s:
            self.checked = time.monotonic()
            larger = max(self.sizes.now() - self.world_size, 0)
        if not broadcast_from_rank_zero(larger):  # every rank takes the same branch
            return
        if self.rank == 0:
            log.info(
                "elastic: the cluster holds %d workers again; growing at step %d",
                self.world_size + larger,
                step,
            )
        ray.train.report({GROW_KEY: self.world_size + larger, "committed_step": step})
        deadline = time.monotonic() + GROW_WAIT_S
        while time.monotonic() < deadline:  # Ray Train ends this group here
            time.sleep(0.2)
        log.warning("elastic: the worker group was not resized within %g s; training on", GROW_WAIT_S)


def resized_from(run_dir: str, world_size: int) -> dict | None:
    """When this group's size differs from the previous group's of the same driver (events.jsonl:
    the last `start` after the driver's `workers_requested`; a `pretrain resume` on another size is
    not a resize), the sizes and when the newest commit was made (where the time lost starts)."""
    from trainer.events import EventLog

    events = EventLog(run_dir).read()
    requested = max((i for i, e in enumerate(events) if e.get("event") == "workers_requested"), default=-1)
    starts = [e for e in events[requested + 1 :] if e.get("event") == "start"]
    commits = [e for e in events if e.get("event") == "checkpoint"]
    if not starts or starts[-1].get("world_size") in (None, world_size) or not commits:
        return None
    newest = max(commits, key=lambda e: (e.get("step", 0), e.get("time", 0)))
    return {"from_workers": starts[-1]["world_size"], "to_workers": world_size, "since": newest["time"]}
