"""Committed checkpoints in S3-compatible object storage (`checkpoint.storage: s3://bucket/prefix`).

Layout: `s3://bucket/prefix/<run name>/step_<N>/<file>`, the same files as a local checkpoint
directory, `commit.json` uploaded last (after every rank's files are in the store), so a step exists
in the store when its `commit.json` does and every file it lists is there with the recorded size.
A step is made uncommitted (a re-save, retention) by deleting its `commit.json` first.

Plain boto3 with the standard AWS configuration: credentials from the usual chain (env, ~/.aws,
instance role), the endpoint of an S3-compatible store from `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`; botocore's standard retry mode retries throttling and dropped connections.
Ray Train's checkpoint machinery (`ray.train.Checkpoint`, `report(checkpoint=...)`) is not used:
our commit record, not Ray's bookkeeping, decides which checkpoint is complete and valid.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from trainer.s3 import NO_CREDENTIALS, client_error

COMMIT = "commit.json"


class ObjectStoreError(RuntimeError):
    """The object store cannot be reached or refused a request; the message names the object."""


class MissingObject(ObjectStoreError):
    """The object does not exist (deleted, or never uploaded)."""


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


class S3Checkpoints:
    """The checkpoint objects of one run: `s3://bucket/prefix/<run name>/step_<N>/<file>`."""

    def __init__(self, url: str, run_name: str, client=None):
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
        """One client per manager, made on first use (boto3 clients are thread-safe, their creation is not)."""
        with self._lock:
            if self._client is None:
                self._client = s3_client()
            return self._client

    def key(self, step: int, name: str) -> str:
        return f"{self.base}step_{step}/{name}"

    def url(self, step: int, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(step, name)}"

    # ------------------------------------------------------------------ requests
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

    def upload(self, local: Path, step: int, name: str) -> None:
        self._call(
            f"uploading {local} to {self.url(step, name)}",
            self.client.upload_file,
            str(local),
            self.bucket,
            self.key(step, name),
        )

    def download(self, step: int, name: str, dest: Path) -> None:
        """Download one object to `dest` through a temp file in its directory (never half a file)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".download-", suffix=dest.name)
        os.close(fd)
        try:
            self._call(
                self.url(step, name), self.client.download_file, self.bucket, self.key(step, name), tmp
            )
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read_bytes(self, step: int, name: str) -> bytes:
        obj = self._call(
            self.url(step, name), self.client.get_object, Bucket=self.bucket, Key=self.key(step, name)
        )
        return self._call(self.url(step, name), obj["Body"].read)

    def steps(self) -> dict[int, dict[str, int]]:
        """{step: {file name: size}} of every object under the run's prefix (committed or not)."""
        out: dict[int, dict[str, int]] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.base)
        for page in self._call(f"listing s3://{self.bucket}/{self.base}", list, pages):
            for obj in page.get("Contents", []):
                step_dir, _, name = obj["Key"][len(self.base) :].partition("/")
                if step_dir.startswith("step_") and step_dir[5:].isdigit() and name and "/" not in name:
                    out.setdefault(int(step_dir[5:]), {})[name] = obj["Size"]
        return out

    def delete_step(self, step: int, names: list[str]) -> None:
        """Delete a step's objects, `commit.json` first: the step stops existing before its files go."""
        if COMMIT in names:
            self._call(
                self.url(step, COMMIT),
                self.client.delete_object,
                Bucket=self.bucket,
                Key=self.key(step, COMMIT),
            )
        rest = [n for n in names if n != COMMIT]
        for i in range(0, len(rest), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": self.key(step, n)} for n in rest[i : i + 1000]], "Quiet": True}
            resp = self._call(
                f"deleting {self.url(step)}", self.client.delete_objects, Bucket=self.bucket, Delete=batch
            )
            if resp.get("Errors"):
                e = resp["Errors"][0]
                raise ObjectStoreError(f"deleting s3://{self.bucket}/{e.get('Key')}: {e.get('Message')}")

    def uncommit(self, step: int) -> None:
        """Delete a step's `commit.json` (before the step is written again)."""
        self._call(
            self.url(step, COMMIT), self.client.delete_object, Bucket=self.bucket, Key=self.key(step, COMMIT)
        )
