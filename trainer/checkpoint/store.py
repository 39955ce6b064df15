"""Where committed checkpoints are kept: a `Store`, on the local filesystem or in S3.

Every rank writes a step into the same local directory, `<run_dir>/checkpoints/step_<N>/`, and
DeepSpeed reads it back from there. What that directory is depends on the store:

  * `LocalStore` (`checkpoint.storage` empty): the directory is the store, on a local disk or on a
    filesystem every node shares. A step exists when its `commit.json` does.
  * `S3Store` (`checkpoint.storage: s3://bucket/prefix`): the store is
    `s3://bucket/prefix/<run name>/step_<N>/<file>`, the same files; the local directory is a
    staging area and, on each node, a cache of the newest step only (a restart on the same node
    does not download it again). `commit.json` is uploaded last, after every rank's files, so a
    step exists in the store when its `commit.json` does and every file it lists is there with
    the recorded size. A step is made uncommitted (a re-save, retention) by deleting `commit.json`
    first. Plain boto3 with the standard AWS configuration: credentials from the usual chain (env,
    ~/.aws, instance role), the endpoint of an S3-compatible store from `AWS_ENDPOINT_URL_S3` /
    `AWS_ENDPOINT_URL`; botocore's standard retry mode retries throttling and dropped connections.

Ray Train's checkpoint machinery (`ray.train.Checkpoint`, `report(checkpoint=...)`) is not used:
our commit record, not Ray's bookkeeping, decides which checkpoint is complete and valid.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from trainer.errors import PretrainError
from trainer.s3 import NO_CREDENTIALS, client_error

COMMIT = "commit.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class ObjectStoreError(PretrainError, RuntimeError):
    """The store cannot be reached or refused a request; the message names the object."""


class MissingObject(ObjectStoreError):
    """The object does not exist (deleted, or never uploaded)."""


def local_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `step_<N>` directory under `root`, newest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def discard(path: Path) -> None:
    """Remove a local step directory; safe when several processes on one disk do it at once."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # not there, or another process took it
    shutil.rmtree(trash, ignore_errors=True)


class Store(ABC):
    """The committed steps of one run. A step is written into `step_dir(step)` on local disk first;
    the store then holds it (`publish`), lists it, reads it back and deletes it."""

    copy_per_node: bool = False
    """True when every node holds its own local copy of a step (split and converted per node);
    False when all ranks share one copy."""

    in_place: bool = True
    """True when the local step directory is the stored copy (checking it needs no download)."""

    def __init__(self, root: Path):
        self.root = root

    def step_dir(self, step: int) -> Path:
        """The local directory where every rank writes the step and DeepSpeed reads it back."""
        return self.root / f"step_{step}"

    @abstractmethod
    def where(self, step: int | None = None, name: str = "") -> str:
        """How messages name the store, a stored step or one of its files."""

    @abstractmethod
    def steps(self) -> dict[int, dict[str, int]]:
        """{step: {file name: size}} of every stored step, committed or not."""

    @abstractmethod
    def read(self, step: int, name: str) -> bytes:
        """A stored file's bytes; MissingObject when it is not there."""

    @abstractmethod
    def publish(self, step: int, name: str) -> None:
        """Store the finished local file `step_dir(step) / name`."""

    @abstractmethod
    def fetch(self, step: int, name: str) -> bool:
        """Replace the local file with the stored one; False when they are one and the same file
        (nothing to fetch). MissingObject when the store has no such file."""

    @abstractmethod
    def uncommit(self, step: int) -> None:
        """Delete a step's `commit.json` (before the step is written again): it stops existing."""

    @abstractmethod
    def delete(self, step: int, names: list[str]) -> None:
        """Delete a stored step, `commit.json` first: the step stops existing before its files go."""

    @abstractmethod
    def evict(self, newest: int) -> None:
        """After `newest` was committed: drop the local copies the store no longer needs."""


class LocalStore(Store):
    """Committed steps in `<run_dir>/checkpoints/` itself (a local disk or a shared filesystem)."""

    def where(self, step: int | None = None, name: str = "") -> str:
        if step is None:
            return str(self.root)
        return str(self.step_dir(step) / name) if name else str(self.step_dir(step))

    def steps(self) -> dict[int, dict[str, int]]:
        return {
            step: {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
            for step, path in local_steps(self.root)
        }

    def read(self, step: int, name: str) -> bytes:
        try:
            return (self.step_dir(step) / name).read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"{self.where(step, name)} is missing") from None
        except OSError as e:
            raise ObjectStoreError(f"reading {self.where(step, name)}: {e}") from None

    def publish(self, step: int, name: str) -> None:
        pass  # written in place

    def fetch(self, step: int, name: str) -> bool:
        return False  # the local file is the stored one

    def uncommit(self, step: int) -> None:
        (self.step_dir(step) / COMMIT).unlink(missing_ok=True)

    def delete(self, step: int, names: list[str]) -> None:
        self.uncommit(step)
        shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def evict(self, newest: int) -> None:
        pass  # the local copies are the store


def s3_client():
    """A boto3 S3 client with the standard credential chain and endpoint variables."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ObjectStoreError(
            "checkpoint.storage: s3:// needs boto3, which is not installed: pip install 'pretrain[s3]' "
            "(the `s3` extra) or pip install boto3"
        ) from None
    config = Config(retries={"mode": "standard", "max_attempts": 5})
    return boto3.session.Session().client("s3", config=config)


class S3Store(Store):
    """Committed steps in `s3://bucket/prefix/<run name>/step_<N>/<file>`; `root` is the local
    staging area and the cache of the newest step."""

    copy_per_node = True
    in_place = False

    def __init__(self, url: str, run_name: str, root: Path, client=None):
        super().__init__(root)
        if not url.startswith("s3://"):
            raise ObjectStoreError(f"checkpoint.storage {url!r} is not an s3://bucket/prefix")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket or not run_name:
            raise ObjectStoreError(f"checkpoint.storage {url!r}: no bucket or no run name ({run_name!r})")
        self.bucket = bucket
        self.base = "/".join(p for p in (prefix.strip("/"), run_name) if p) + "/"
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self):
        """One client per store, made on first use (boto3 clients are thread-safe, their creation is not)."""
        with self._lock:
            if self._client is None:
                self._client = s3_client()
            return self._client

    def key(self, step: int, name: str) -> str:
        return f"{self.base}step_{step}/{name}"

    def where(self, step: int | None = None, name: str = "") -> str:
        if step is None:
            return f"s3://{self.bucket}/{self.base}"
        return f"s3://{self.bucket}/{self.key(step, name)}"

    def _call(self, what: str, fn, *args, **kw):
        """fn(*args, **kw), its errors turned into ObjectStoreError / MissingObject naming `what`."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(*args, **kw)
        except NoCredentialsError:
            raise ObjectStoreError(f"{what}: {NO_CREDENTIALS}") from None
        except ClientError as e:
            code, _, line = client_error(e)
            if code in ("404", "NoSuchKey", "NotFound"):
                raise MissingObject(f"{what} is missing") from None
            raise ObjectStoreError(f"{what}: {line}") from None
        except BotoCoreError as e:  # endpoint unreachable, timeouts, dropped connections (after retries)
            raise ObjectStoreError(f"{what}: {type(e).__name__}: {e}") from None

    def publish(self, step: int, name: str) -> None:
        local = self.step_dir(step) / name
        self._call(
            f"uploading {local} to {self.where(step, name)}",
            self.client.upload_file,
            str(local),
            self.bucket,
            self.key(step, name),
        )

    def fetch(self, step: int, name: str) -> bool:
        self.download(step, name, self.step_dir(step) / name)
        return True

    def download(self, step: int, name: str, dest: Path) -> None:
        """Download one object to `dest` through a temp file in its directory (never half a file)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".download-", suffix=dest.name)
        os.close(fd)
        try:
            self._call(
                self.where(step, name), self.client.download_file, self.bucket, self.key(step, name), tmp
            )
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, step: int, name: str) -> bytes:
        obj = self._call(
            self.where(step, name), self.client.get_object, Bucket=self.bucket, Key=self.key(step, name)
        )
        return self._call(self.where(step, name), obj["Body"].read)

    def steps(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.base)
        for page in self._call(f"listing {self.where()}", list, pages):
            for obj in page.get("Contents", []):
                step_dir, _, name = obj["Key"][len(self.base) :].partition("/")
                m = _STEP_DIR.match(step_dir)
                if m and name and "/" not in name:
                    out.setdefault(int(m.group(1)), {})[name] = obj["Size"]
        return out

    def uncommit(self, step: int) -> None:
        self._call(
            self.where(step, COMMIT),
            self.client.delete_object,
            Bucket=self.bucket,
            Key=self.key(step, COMMIT),
        )

    def delete(self, step: int, names: list[str]) -> None:
        if COMMIT in names:
            self.uncommit(step)
        rest = [n for n in names if n != COMMIT]
        for i in range(0, len(rest), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": self.key(step, n)} for n in rest[i : i + 1000]], "Quiet": True}
            resp = self._call(
                f"deleting {self.where(step)}", self.client.delete_objects, Bucket=self.bucket, Delete=batch
            )
            if resp.get("Errors"):
                e = resp["Errors"][0]
                raise ObjectStoreError(f"deleting s3://{self.bucket}/{e.get('Key')}: {e.get('Message')}")

    def evict(self, newest: int) -> None:
        for step, path in local_steps(self.root):  # only the newest stays, as a cache for a restart here
            if step != newest:
                discard(path)


def open_store(run_dir: str | Path, storage: str) -> Store:
    """The store of the run at `run_dir`: S3 when `storage` is an s3:// URL, else the run dir."""
    root = Path(run_dir) / "checkpoints"
    if storage:
        return S3Store(storage, os.path.basename(os.path.abspath(run_dir)), root)
    return LocalStore(root)
