"""DeepSpeed's `save_checkpoint`, with every write it makes guarded, fsynced and listed.

DeepSpeed's save is collective: a barrier after rank 0 creates the directory, an all-reduce of the
tag, a barrier at the end (checked on deepspeed 0.19.8). A rank whose write raises (a full disk,
an I/O error) leaves the others at the next of these until the process group's timeout (30
minutes). So each write DeepSpeed makes during a save goes through a guard that keeps the first
error and skips this rank's later writes, and DeepSpeed reaches its barriers on every rank; the
error is raised when `save_checkpoint` returns, where the ranks exchange their outcomes
(`CheckpointManager.on_all_ranks`). Every file written is fsynced before the save returns, so a
commit record never lists a file that a power cut could still lose.

An asynchronous save (`snapshot`) runs the same `save_checkpoint`, but each file's state is copied
to host memory (pinned when it lives on a GPU) and written later by `Snapshot.write`, in a
background thread: the files are the bytes the synchronous save writes.

Where DeepSpeed writes during a save, and how the guard gets there, is in
`trainer/library_internals.py` (`checkpoint_writes_through`).
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import threading
from collections.abc import Callable

import torch

from trainer import library_internals
from trainer.fsutil import fsync_dir

_NEARLY_FULL = 1 << 20  # bytes free below which a write that failed without an errno hit a full disk


class _Writes:
    """The files one rank wrote during a save, and the first write that failed."""

    def __init__(self):
        self.files: list[str] = []
        self.error: BaseException | None = None

    def run(self, fn, path: str | None):
        if self.error is not None:
            return None  # this save already failed on this rank: write nothing more
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - any failed write fails the save, reported later
            self.error = _with_path(e, path)
            return None
        if path is not None and os.path.isfile(path):
            self.files.append(path)
        return out


def _with_path(e: Exception, path: str | None) -> Exception:
    """The error of a failed write, naming the file. torch's zip writer reports a short write as a
    RuntimeError ("unexpected pos ...") without the errno: on a disk with (next to) nothing free at
    that moment it is taken for what it is, ENOSPC."""
    if isinstance(e, OSError):
        return OSError(e.errno, e.strerror or str(e), path) if path and not e.filename else e
    if path:
        try:
            free = shutil.disk_usage(os.path.dirname(path) or ".").free
        except OSError:
            return e
        if free < _NEARLY_FULL:
            why = f"{os.strerror(errno.ENOSPC)} ({free:,} bytes free when torch's writer stopped short)"
            return OSError(errno.ENOSPC, why, path)
    return e


def fsync_files(paths: list[str]) -> None:
    """Each file's data and the directories holding them on stable storage."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in sorted({os.path.dirname(p) for p in paths}):
        fsync_dir(d)


def save(engine, root: str, tag: str) -> list[str]:
    """`engine.save_checkpoint(root, tag)` (explicit tag, no `latest` file); the files this rank
    wrote, fsynced with their directory and `root`. Raises this rank's first failed write only
    after DeepSpeed's own collectives are done on every rank."""
    writes = _Writes()
    with library_internals.checkpoint_writes_through(engine, writes.run):
        engine.save_checkpoint(root, tag=tag, client_state={}, save_latest=False)
    if writes.error is not None:
        raise writes.error
    fsync_files(writes.files)
    fsync_dir(root)  # the step directory's own entry
    return writes.files


_PLAIN = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


class _HostCopy:
    """Copies DeepSpeed's save state (dicts, lists, tuples of tensors and plain values) so that
    training may change the original: each tensor storage copied once into host memory (pinned
    when it is on a GPU), views kept as views of the copy, and shared objects kept shared, so
    torch.save writes the same bytes from the copy as from the original. Buffers of an earlier
    copy (`reuse`, of the same sizes: the same model) are filled again rather than allocated:
    fresh memory costs a page fault per page, pinned memory a slow allocation."""

    def __init__(self, reuse: list[torch.Tensor] = ()):
        # host tensors' bytes are copied later, by `Snapshot.copy`: (host buffer, source bytes)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.objects: dict[int, tuple[object, object]] = {}  # id -> (original kept alive, copy)
        self.storages: dict[tuple, torch.UntypedStorage] = {}
        self.buffers: list[torch.Tensor] = []  # every host buffer this copy fills
        self.spare: dict[tuple[int, bool], list[torch.Tensor]] = {}
        for buf in reuse:
            self.spare.setdefault((buf.numel(), buf.is_pinned()), []).append(buf)
        self.from_gpu = False

    def __call__(self, x):
        if isinstance(x, _PLAIN):
            return x
        if id(x) in self.objects:
            return self.objects[id(x)][1]
        if isinstance(x, torch.Tensor):
            out = self._tensor(x)
        elif isinstance(x, dict):
            out = copy.copy(x)  # keeps the mapping's type (OrderedDict, defaultdict)
            out.clear()
            out.update((k, self(v)) for k, v in x.items())
        elif isinstance(x, list):
            out = [self(v) for v in x]
        elif type(x) is tuple:
            out = tuple(self(v) for v in x)
        else:
            out = copy.deepcopy(x)
        self.objects[id(x)] = (x, out)
        return out

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        if (
            t.layout != torch.strided
            or t.device.type == "meta"
            or type(t) not in (torch.Tensor, torch.nn.Parameter)
        ):
            return t.detach().to("cpu", copy=True)
        src = t.untyped_storage()
        key = (src.device, src.data_ptr(), src.nbytes())
        host = self.storages.get(key) if src.nbytes() else None
        if host is None:
            pinned = src.device.type == "cuda"
            self.from_gpu |= pinned
            spare = self.spare.get((src.nbytes(), pinned))
            buf = spare.pop() if spare else torch.empty(src.nbytes(), dtype=torch.uint8, pin_memory=pinned)
            self.buffers.append(buf)
            source = torch.empty(0, dtype=torch.uint8, device=src.device).set_(src)
            if not pinned:
                self.pending.append((buf, source))
            else:  # a device's copy is queued on its stream now: it costs the step path nothing
                buf.copy_(source, non_blocking=pinned)
            host = self.storages[key] = buf.untyped_storage()
        out = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
        if t.requires_grad:
            out.requires_grad_(True)
        if isinstance(t, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
        for k, v in vars(t).items():  # attributes torch.save pickles with the tensor
            setattr(out, k, self(v))
        return out


class Snapshot:
    """One rank's part of a save, held in host memory: `copy()` fills the host memory from state
    that lives in host memory too (deferred, so the step path does not wait for it), `write()`
    writes it; both may run in any thread. Until `copied` is set, the state must not change:
    the caller holds the next optimizer step back (`wait_copied`)."""

    def __init__(
        self,
        root: str,
        files: list[tuple[Callable[[], None], str]],
        gpu_copied,
        buffers: list,
        pending: list[tuple[torch.Tensor, torch.Tensor]] = (),
    ):
        self.root, self.files, self._gpu_copied = root, files, gpu_copied
        self.buffers = buffers  # the host memory holding it: free to reuse once it is written
        self._pending = list(pending)
        self.copied = threading.Event()
        if not self._pending:
            self.copied.set()

    def copy(self) -> None:
        """The deferred host-to-host copies, then `copied` is set (also when a copy failed: the
        error is raised here, and the write is not made)."""
        try:
            for buf, source in self._pending:
                buf.copy_(source)
        finally:
            self._pending = []  # the sources (the live state) are let go
            self.copied.set()

    def wait_copied(self) -> None:
        self.copied.wait()

    def write(self) -> list[str]:
        """Every file written and fsynced with its directory; the paths. Raises the first failed
        write naming its file (the files after it are not written)."""
        if self._pending:
            self.copy()
        if self._gpu_copied is not None:
            self._gpu_copied.synchronize()  # the device-to-host copies have landed
        writes, files = _Writes(), self.files
        self.files = []  # the state is dropped as it is written: only the buffers stay
        for write, path in files:
            made = set(os.listdir(path)) if os.path.isdir(path) else None  # a write into a directory
            writes.run(write, path)
            if writes.error is not None:
                raise writes.error
            if made is not None:
                writes.files += [os.path.join(path, n) for n in sorted(set(os.listdir(path)) - made)]
        del files
        fsync_files(writes.files)
        fsync_dir(self.root)  # the step directory's own entry
        return writes.files


def snapshot(engine, root: str, tag: str, reuse: list[torch.Tensor] = ()) -> Snapshot:
    """`engine.save_checkpoint(root, tag)` with each file's state copied to host memory instead of
    written (directories are made now), into the buffers of an earlier snapshot where they fit
    (`reuse`: `Snapshot.buffers` of one that is written). DeepSpeed's collectives run as in
    `save`; a failed copy (out of host memory) is raised after them. Only directories are made
    now: every file, the recovery scripts too, is written by `Snapshot.write`. The bytes of
    tensors already in host memory are copied by `Snapshot.copy`, not now."""
    writes, copier, files = _Writes(), _HostCopy(reuse), []

    def hold(write, path: str, state) -> None:
        if state is None:  # DeepSpeed's recovery scripts: copied into the directory `path` later
            files.append((lambda: write(None), path))
            return
        held = writes.run(lambda: copier(state), None)
        files.append((lambda: write(held), path))

    with library_internals.checkpoint_writes_through(engine, writes.run, file_run=hold):
        engine.save_checkpoint(root, tag=tag, client_state={}, save_latest=False)
    if writes.error is not None:
        raise writes.error
    gpu_copied = None
    if copier.from_gpu:
        gpu_copied = torch.cuda.Event()
        gpu_copied.record()
    return Snapshot(root, files, gpu_copied, copier.buffers, copier.pending)
