"""`pretrain prepare --address HEAD` (or inside a Ray job): prepare's units as Ray tasks.

Ray tasks, not Ray Data: a unit is a named file with a completion record, run in a fixed list order,
which tasks give directly; Ray Data's outputs are unordered unless asked, named at random and may
spill, and it would bring nothing the units need. Every node must see the output's parent
directory (a shared filesystem), since the units write their files there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

from cluster.driver import check_ray_address


def ray_runner(address: str) -> Callable[[Callable[..., Any], list[tuple]], Iterator[Any]]:
    """A prepare `Runner` (trainer/data/pipeline.py) on the Ray cluster at `address`: one task per
    unit; when there are fewer units than CPUs, each gets several (threads inside the unit)."""
    import ray

    if not ray.is_initialized():
        check_ray_address(address, "--address")
        ray.init(address=address, log_to_driver=True)
    alive = [n for n in ray.nodes() if n["Alive"]]
    cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
    print(
        f"[prepare] on the Ray cluster at {address}: {len(alive)} nodes, {cpus:g} CPUs",
        file=sys.stderr,
        flush=True,
    )

    def run(fn: Callable[..., Any], arglist: list[tuple], gil_bound: bool = False) -> Iterator[Any]:
        # Every task is a process of its own, GIL-bound or not.
        if not arglist:
            return
        nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
        total, biggest = int(sum(nodes)) or 1, int(max(nodes, default=1)) or 1
        threads = max(1, min(biggest, total // len(arglist)))
        task = ray.remote(num_cpus=threads, max_retries=3)(fn)
        what = fn.__name__.replace("_", " ")
        print(f"[prepare] {len(arglist)} {what} tasks, {threads} CPUs each", file=sys.stderr, flush=True)
        refs = [task.remote(*args, threads=threads) for args in arglist]
        got = 0
        try:
            for ref in refs:
                yield ray.get(ref)
                got += 1
        finally:
            for ref in refs[got + 1 :]:  # not started or running: the caller stopped early or failed
                ray.cancel(ref)

    return run
