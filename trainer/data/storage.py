"""Where shards come from: a local directory or an http(s) URL, always read as a stream.

Shards are tar files (WebDataset layout: `<key>.tokens` members holding raw little-endian token
ids). Nothing here unpickles or shells out; the bytes are handed back as they are.
"""

from __future__ import annotations

import io
import os
import urllib.request
from collections.abc import Iterator
from contextlib import closing

from webdataset.tariterators import tar_file_iterator


class StorageError(OSError):
    """A shard or manifest cannot be read; the message names the location."""


def is_remote(root: str) -> bool:
    return root.startswith(("http://", "https://"))


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else os.path.join(root, name)


def open_stream(root: str, name: str) -> io.BufferedIOBase:
    """A binary stream for `root/name`, local or http(s)."""
    where = join(root, name)
    try:
        if is_remote(root):
            return urllib.request.urlopen(where, timeout=60)  # noqa: S310 (http/https only, checked above)
        return open(where, "rb")
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read {where}: {e}") from None


def read_text(root: str, name: str) -> str:
    with closing(open_stream(root, name)) as f:
        return f.read().decode("utf-8")


def open_shard(root: str, name: str) -> Iterator[bytes]:
    """The `tokens` payload of each sample of one shard, in stored order, streamed."""
    with closing(open_stream(root, name)) as f:
        try:
            for member in tar_file_iterator(f):
                if member["fname"].endswith(".tokens"):
                    yield member["data"]
        except Exception as e:  # tarfile.ReadError, truncated stream, connection reset
            raise StorageError(f"{join(root, name)}: not a readable shard ({e})") from None
