"""What the driver can tell of a run's committed checkpoints before any worker starts, without
importing torch (`trainer/checkpoint/` does): which steps of a store have a commit record whose
listed files are all there with the recorded sizes. The store's layout is `trainer/checkpoint/
store.py`'s (`<run_dir>/checkpoints/step_<N>/`, or `s3://bucket/prefix/<run name>/step_<N>/`);
`tests/test_run_safety.py` checks this reading against steps that store wrote. The workers still
verify every file's sha256 before they load a step."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cluster.errors import RunError

COMMIT = "commit.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def where(run_dir: Path, storage: str) -> str:
    """The store of the run's checkpoints, as messages name it."""
    if storage:
        return f"{storage.rstrip('/')}/{run_dir.name}/"
    return str(run_dir / "checkpoints")


def newest_commit(run_dir: Path, storage: str) -> int | None:
    """The newest step of the store whose commit record lists files that are all there, at their
    recorded sizes; None when there is none. RunError when the store cannot be listed."""
    steps, read = _s3_steps(run_dir, storage) if storage else _local_steps(run_dir / "checkpoints")
    for step in sorted((s for s, files in steps.items() if COMMIT in files), reverse=True):
        try:
            record = json.loads(read(step))
            files = record["files"]
            if all(steps[step].get(name) == info["size"] for name, info in files.items()):
                return step
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            continue
    return None


def _local_steps(root: Path):
    steps: dict[int, dict[str, int]] = {}
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                steps[int(m.group(1))] = {f.name: f.stat().st_size for f in p.iterdir() if f.is_file()}
    return steps, lambda step: (root / f"step_{step}" / COMMIT).read_bytes()


def s3_location(run_dir: Path, storage: str) -> tuple[str, str]:
    """(bucket, key prefix ending in /) of the run's checkpoints under `storage` (s3://bucket/prefix)."""
    bucket, _, prefix = storage[len("s3://") :].partition("/")
    return bucket, "/".join(p for p in (prefix.strip("/"), run_dir.name) if p) + "/"


def s3_client():
    """A boto3 S3 client (standard credential chain, endpoint variables and retry mode)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise RunError(
            "checkpoint.storage: s3:// needs boto3: pip install boto3", field="checkpoint.storage"
        ) from None
    config = Config(retries={"mode": "standard"})  # AWS_MAX_ATTEMPTS still applies
    return boto3.session.Session().client("s3", config=config)


def _s3_steps(run_dir: Path, storage: str):
    client = s3_client()
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, base = s3_location(run_dir, storage)
    steps: dict[int, dict[str, int]] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            for obj in page.get("Contents", []):
                step_dir, _, name = obj["Key"][len(base) :].partition("/")
                m = _STEP_DIR.match(step_dir)
                if m and name and "/" not in name:
                    steps.setdefault(int(m.group(1)), {})[name] = obj["Size"]
    except (BotoCoreError, ClientError) as e:
        raise RunError(
            f"checkpoint.storage: cannot list the run's checkpoints in s3://{bucket}/{base}: {e}",
            field="checkpoint.storage",
        ) from None

    def read(step: int) -> bytes:
        try:
            return client.get_object(Bucket=bucket, Key=f"{base}step_{step}/{COMMIT}")["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise OSError(str(e)) from None

    return steps, read
