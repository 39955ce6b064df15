"""How a failed S3 request reads, the same for the shard reader (trainer/data/storage.py) and the
checkpoint store (trainer/checkpoint/store.py); each decides for itself what to retry."""

from __future__ import annotations

NO_CREDENTIALS = (
    "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an "
    "instance role)"
)


def client_error(e) -> tuple[str, int, str]:
    """A botocore `ClientError`'s code ("NoSuchKey", "403", ...), HTTP status and the line to show:
    `S3 <code> (HTTP <status>): <message>`."""
    err = e.response.get("Error", {})
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = err.get("Code", "?")
    return code, status, f"S3 {code} (HTTP {status}): {err.get('Message', '')}"
