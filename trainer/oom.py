"""Out of device memory, reported as such: the rank, the phase, the memory figures and what to
change, as one expected failure that ends the run (a restart would run out again)."""

from __future__ import annotations

import contextlib

import torch

from trainer.errors import PretrainError
from trainer.progress import Progress


class OutOfMemory(PretrainError, RuntimeError):
    """A rank ran out of device memory: the same step would run out again after a restart."""

    restartable = False
    alone = True  # one rank's failure, not agreed with its peers (they wait in a collective)


def out_of_memory(
    error: BaseException, rank: int, phase: str, step: int, device: torch.device, parallel
) -> OutOfMemory:
    """The user's message for a `torch.OutOfMemoryError` on `rank` in `phase` of 0-based `step`:
    the memory figures and what to change (`parallel`: the ParallelConfig)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        figures = (
            f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated, "
            f"{torch.cuda.memory_reserved(device) / 2**30:.2f} GiB reserved, "
            f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB on {device}"
        )
    else:
        import psutil

        vm = psutil.virtual_memory()
        rss = psutil.Process().memory_info().rss
        figures = (
            f"process resident {rss / 2**30:.2f} GiB, {vm.available / 2**30:.2f} GiB available "
            f"of {vm.total / 2**30:.2f} GiB"
        )
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    fixes = []
    if parallel.micro_batch_size > 1:
        fixes.append(
            f"lower parallel.micro_batch_size (now {parallel.micro_batch_size}; the global batch "
            "stays, by gradient accumulation)"
        )
    if not parallel.activation_checkpointing:
        fixes.append("set parallel.activation_checkpointing: true (recomputes activations in backward)")
    if parallel.zero_stage < 3 and parallel.pp == 1:
        fixes.append(
            f"raise parallel.zero_stage (now {parallel.zero_stage}) to 3 (partitions the parameters)"
        )
    fixes.append("or run on more GPUs (cluster.num_workers) or larger ones")
    return OutOfMemory(
        f"out of memory on rank {rank} in {phase} of step {step + 1}: {cause} ({figures}); to fit, "
        + "; ".join(fixes),
        field="parallel.micro_batch_size",
    )


@contextlib.contextmanager
def reports_out_of_memory(progress: Progress, device: torch.device, parallel, rank: int):
    """Turns a `torch.OutOfMemoryError` raised within into `OutOfMemory`, naming where it happened."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise out_of_memory(e, rank, progress.phase, progress.step, device, parallel) from e
