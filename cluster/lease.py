"""The run lease: one driver at a time writes a run.

`<run_dir>/lease.json` names the driver that holds the run (host, pid, when it took it, its last
heartbeat, a random token). The holder keeps the file open with an exclusive `flock` and a daemon
thread rewrites the heartbeat every few seconds (in place, the record padded to a fixed length, so
the lock's inode never changes and a reader never sees a shorter file). Taking the lease:

  * the lock is held (`flock` refuses): the holder is alive on a filesystem that shares locks:
    refused, naming the holder;
  * the lock is free and the file names no holder (new, empty, or left half-written): taken;
  * the lock is free and the file names a holder that did not release it: on this host with a dead
    pid, or with a heartbeat older than `cluster.lease_timeout_s` (a lost machine on a filesystem
    whose locks do not reach other hosts), taken over, with a warning and a `lease_taken_over`
    event; else (a live holder on another host) refused.

The file is not created with O_EXCL: a lease left by a killed driver must be taken over in place,
and the `flock` on the one inode (checked against the path after locking, since a releasing holder
unlinks it) is what decides between two drivers starting at once. Released at the driver's exit
(normal, error, SIGTERM: the driver's `finally`; a kill leaves it to be taken over). A holder whose
heartbeat finds another driver's token in the file has lost the run: it logs an error and stops
itself with SIGTERM, as `pretrain stop` would.

With `checkpoint.storage: s3://bucket/prefix` the same record is also an object beside the run's
checkpoints, `s3://bucket/prefix/<run>/lease.json` (`ObjectLease`), for drivers on machines that do
not share the run directory but would write one prefix: created with a conditional put
(`If-None-Match: *`), renewed and taken over with `If-Match` on the ETag last seen (so of two
drivers taking over one stale lease, one wins), deleted with `If-Match` at release.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cluster.commits import s3_client, s3_location
from cluster.errors import RunError
from trainer.events import EventLog

log = logging.getLogger("pretrain")

LEASE = "lease.json"
RECORD_BYTES = 1024  # the record, padded: rewritten in place, its length never changes


class LeaseHeld(RunError):
    """Another driver holds the run; the message names it (host, pid, since, last heartbeat)."""


def _now_text(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _try_lock(fd: int, kind: int, tries: int = 1) -> bool:
    """`flock(fd, kind)` without waiting (`tries` times, 0.1 s apart); False when another holds it."""
    for i in range(tries):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if i + 1 < tries:
            time.sleep(0.1)
    return False


def parse_record(raw: bytes) -> dict | None:
    """A lease record, or None when the bytes are not one (empty, torn, garbled)."""
    try:
        record = json.loads(raw.decode())
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    types = {"host": str, "pid": int, "since": (int, float), "heartbeat": (int, float), "token": str}
    ok = all(isinstance(record.get(k), t) for k, t in types.items())
    return record if ok else None


def describe_holder(record: dict | None, now: float | None = None) -> str:
    """`pid P on host H, since T, last heartbeat S s ago`, for messages."""
    if record is None:
        return "a driver that is starting (its record is not written yet)"
    now = time.time() if now is None else now
    return (
        f"pid {record['pid']} on host {record['host']}, since {_now_text(record['since'])}, "
        f"last heartbeat {max(0.0, now - record['heartbeat']):.0f} s ago"
    )


class RunLease:
    """The lease of the run at `run_dir`; `acquire()` takes it or raises LeaseHeld, `release()`
    gives it back (safe to call twice, and when it was never taken)."""

    def __init__(
        self,
        run_dir: str | Path,
        timeout_s: float,
        storage: str = "",
        heartbeat_s: float | None = None,
        on_lost: Callable[[dict], None] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEASE
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(5.0, self.timeout_s / 4)
        self.host = socket.gethostname()
        self.token = secrets.token_hex(8)
        self.since = 0.0
        self._fd: int | None = None
        self._fd_lock = threading.Lock()  # the heartbeat never writes to an fd release() has closed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.on_lost = on_lost or _stop_this_driver
        self.object = ObjectLease(self, storage) if storage.startswith("s3://") else None

    # ------------------------------------------------------------------ take
    def acquire(self) -> dict | None:
        """Take the lease; returns the record of the holder taken over from (None if there was none).
        LeaseHeld naming the holder when another driver holds it; nothing is written then."""
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                taken_over = self._take(fd)
            except _Replaced:  # released (unlinked) by its holder between our open and our lock
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            break
        else:
            raise RunError(f"{self.path}: could not take the run lease (it kept changing); try again")
        if self.object is not None:
            try:
                object_taken_over = self.object.acquire()
            except BaseException:
                self.release()
                raise
        self._start_heartbeat()
        self._taken_over(taken_over, str(self.path))
        if self.object is not None:
            self._taken_over(object_taken_over, self.object.where)
        return taken_over if self.object is None else taken_over or object_taken_over

    def _taken_over(self, previous: dict | None, where: str) -> None:
        """The warning and the event of a takeover from `previous` (None: nothing was taken over)."""
        if previous is None:
            return
        stale = time.time() - previous["heartbeat"]
        log.warning(
            "took over the lease of run %s (%s) from %s: %s; this driver writes the run now",
            self.run_dir.name,
            where,
            describe_holder(previous),
            "that process is gone (killed?)"
            if self._dead_here(previous)
            else f"no heartbeat for {stale:.0f} s (more than cluster.lease_timeout_s={self.timeout_s:g})",
        )
        EventLog(str(self.run_dir)).write(
            "lease_taken_over",
            lease=where,
            previous={k: previous[k] for k in ("host", "pid", "since", "heartbeat")},
            stale_s=round(stale, 3),
            host=self.host,
            pid=os.getpid(),
        )

    def _take(self, fd: int) -> dict | None:
        if not _try_lock(fd, fcntl.LOCK_EX, tries=3):  # a `check()` elsewhere holds it for an instant
            holder = self._read_settled()
            self._check_same_file(fd)  # a holder releasing it right now: try again
            raise LeaseHeld(self._held_message(holder, locked=True)) from None
        self._check_same_file(fd)
        previous = parse_record(os.pread(fd, RECORD_BYTES, 0))
        if previous is None:
            return self._write_first(fd, None)
        if self._alive(previous):
            raise LeaseHeld(self._held_message(previous, locked=False))
        return self._write_first(fd, previous)

    def check(self) -> None:
        """Raise LeaseHeld when a live driver holds the lease, as `acquire` would; takes nothing,
        writes nothing (a command refused for another reason leaves the run as it was)."""
        self.check_file()
        self.check_object()

    def check_object(self) -> None:
        """`check` of the S3 object alone (none without S3 storage)."""
        if self.object is not None:
            record, _ = self.object.read()
            if record is not None and self._alive(record):
                raise LeaseHeld(self._held_message(record, locked=False, where=self.object.where))

    def check_file(self) -> None:
        """`check` of the run directory's lease file alone."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if not _try_lock(fd, fcntl.LOCK_SH):
                raise LeaseHeld(self._held_message(self._read_settled(), locked=True))
            previous = parse_record(os.pread(fd, RECORD_BYTES, 0))
            if previous is not None and self._alive(previous):
                raise LeaseHeld(self._held_message(previous, locked=False))
        finally:
            os.close(fd)

    def _alive(self, record: dict) -> bool:
        """Whether the unlocked lease `record` names a driver that may still be writing: its
        heartbeat is younger than the timeout (locks may not reach across hosts), and it is not a
        pid of this host that is gone."""
        fresh = time.time() - record["heartbeat"] < self.timeout_s
        return fresh and not self._dead_here(record)

    def _check_same_file(self, fd: int) -> None:
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                raise _Replaced
        except FileNotFoundError:
            raise _Replaced from None

    def _write_first(self, fd: int, previous: dict | None) -> dict | None:
        self.since = time.time()
        self._write(fd, self.since)
        return previous

    def _dead_here(self, record: dict) -> bool:
        return record["host"] == self.host and not _pid_alive(int(record["pid"]))

    def _read_settled(self) -> dict | None:
        """The holder's record; a read that meets a rewrite in progress is tried again."""
        for _ in range(5):
            try:
                record = parse_record(self.path.read_bytes()[:RECORD_BYTES])
            except FileNotFoundError:
                return None
            if record is not None:
                return record
            time.sleep(0.05)
        return None

    def _held_message(self, holder: dict | None, locked: bool, where: str = "") -> str:
        why = (
            "it holds the lease's lock, so it is alive"
            if locked
            else f"its heartbeat is younger than cluster.lease_timeout_s={self.timeout_s:g} s"
        )
        return (
            f"run {self.run_dir.name} is being written by another driver: {describe_holder(holder)} "
            f"({why}; lease {where or self.path}). Two drivers must not write one run: wait for it to end, "
            "or stop it (`pretrain stop RUN` for a submitted run, or kill that pid on its host) and run "
            "this again; a driver whose machine is gone is taken over once its heartbeat is "
            f"cluster.lease_timeout_s={self.timeout_s:g} s old"
        )

    # ------------------------------------------------------------------ renew
    def _record(self, heartbeat: float) -> bytes:
        record = {
            "host": self.host,
            "pid": os.getpid(),
            "since": self.since,
            "heartbeat": heartbeat,
            "token": self.token,
            "timeout_s": self.timeout_s,
        }
        data = json.dumps(record, sort_keys=True).encode()  # no secret in it: it is shown to others
        if len(data) >= RECORD_BYTES:
            raise RunError(f"{self.path}: lease record longer than {RECORD_BYTES} bytes (host name?)")
        return data.ljust(RECORD_BYTES - 1) + b"\n"

    def _write(self, fd: int, heartbeat: float) -> None:
        os.pwrite(fd, self._record(heartbeat), 0)
        os.fsync(fd)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._fd_lock:
                if self._fd is None:
                    return
                current = None
                try:
                    current = parse_record(self.path.read_bytes()[:RECORD_BYTES])
                    if current is not None and current["token"] != self.token:
                        self.lost = True
                    else:
                        self._write(self._fd, time.time())
                except FileNotFoundError:
                    pass  # the run directory was removed under us
                except OSError as e:
                    log.warning("could not renew the lease %s: %s", self.path, e)
                if self.object is not None and not self.lost:
                    try:
                        current = self.object.renew(self._record(time.time()))
                        self.lost = current is not None
                    except RunError as e:
                        log.warning("could not renew the lease %s: %s", self.object.where, e)
            if self.lost:
                self.on_lost(current)
                return

    # ------------------------------------------------------------------ give back
    def release(self) -> None:
        """Stop renewing, remove the lease file (if it is still ours) and unlock it."""
        self._stop.set()
        with self._fd_lock:
            fd, self._fd = self._fd, None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.object is not None and not self.lost:
            self.object.release()
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if not self.lost and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)  # still locked: a driver waiting on this inode sees it replaced
        finally:
            os.close(fd)

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _stop_this_driver(holder: dict) -> None:
    """Another driver took the run over (this one's heartbeat was late past its timeout): stop
    writing it, the way `pretrain stop` stops a driver."""
    log.error("the run was taken over by another driver (%s): this driver stops", describe_holder(holder))
    os.kill(os.getpid(), signal.SIGTERM)


class ObjectLease:
    """The lease's record as an S3 object beside the run's checkpoints, written only by conditional
    requests: `acquire` creates it (If-None-Match: *) or replaces a stale one (If-Match: the ETag
    read), `renew` replaces it (If-Match: our last ETag), `release` deletes it (If-Match)."""

    def __init__(self, owner: RunLease, storage: str):
        self.owner = owner
        self.bucket, base = s3_location(owner.run_dir, storage)
        self.key = base + LEASE
        self.where = f"s3://{self.bucket}/{self.key}"
        self.etag: str | None = None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _call(self, fn, **kw):
        """fn(Bucket, Key, **kw); None when S3 answers 412/409 (the condition failed, or another
        conditional write was under way), RunError naming the object on any other failure."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, Key=self.key, **kw)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = e.response.get("Error", {}).get("Code", "")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(self.where) from None
            raise RunError(
                f"checkpoint.storage: the run lease {self.where}: {e}", field="checkpoint.storage"
            ) from None
        except BotoCoreError as e:
            raise RunError(
                f"checkpoint.storage: the run lease {self.where}: {e}", field="checkpoint.storage"
            ) from None

    def read(self) -> tuple[dict | None, str | None]:
        """(the stored record, its ETag); (None, None) when there is no lease object."""
        try:
            got = self._call(self.client.get_object)
        except FileNotFoundError:
            return None, None
        if got is None:
            return None, None
        return parse_record(got["Body"].read()), got["ETag"]

    def acquire(self) -> dict | None:
        """Take the object (as the owner's file lease was taken); the record taken over, or None."""
        body = self.owner._record(self.owner.since)
        for _ in range(5):
            put = self._call(self.client.put_object, Body=body, IfNoneMatch="*")
            if put is not None:
                self.etag = put["ETag"]
                return None
            previous, etag = self.read()
            if etag is None:
                continue  # deleted since: create it again
            if previous is not None and self.owner._alive(previous):
                raise LeaseHeld(self.owner._held_message(previous, locked=False, where=self.where))
            put = self._call(self.client.put_object, Body=body, IfMatch=etag)
            if put is not None:
                self.etag = put["ETag"]
                return previous
            time.sleep(0.2)  # another driver replaced it first: look again
        raise RunError(f"{self.where}: could not take the run lease (it kept changing); try again")

    def renew(self, body: bytes) -> dict | None:
        """Write a new heartbeat; the record of the driver that took the object over, or None."""
        try:
            put = self._call(self.client.put_object, Body=body, IfMatch=self.etag)
        except FileNotFoundError:  # deleted by hand: ours again if nobody made another meanwhile
            put = self._call(self.client.put_object, Body=body, IfNoneMatch="*")
        if put is not None:
            self.etag = put["ETag"]
            return None
        current, etag = self.read()
        if current is not None and current["token"] == self.owner.token:
            self.etag = etag  # our own write whose answer was lost, then retried
            return None
        return current or {"host": "?", "pid": "?", "since": 0.0, "heartbeat": 0.0, "token": ""}

    def release(self) -> None:
        if self.etag is None:
            return
        try:
            self._call(self.client.delete_object, IfMatch=self.etag)
        except (RunError, FileNotFoundError) as e:
            log.warning("could not release the lease %s: %s", self.where, e)
        self.etag = None


class _Replaced(Exception):
    """The lease file was unlinked or replaced after we opened it."""
