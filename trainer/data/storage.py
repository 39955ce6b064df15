"""Where shards come from: a local directory, an http(s) URL or S3-compatible object storage.

Roots: a local directory, `http://host/path`, `https://host/path`, or `s3://bucket/prefix`. S3 goes
through boto3 (the `s3` extra: `pip install 'pretrain[s3]'`) with the standard AWS configuration:
credentials from the usual chain (env, ~/.aws, instance role), the endpoint of an S3-compatible store
from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`. Any other scheme, `pipe:` above all, is refused: the
loader never runs a shell command and never unpickles; shard bytes are parsed as plain tar here.

A shard is read as a stream (a file, an HTTP response body, an S3 `get_object()["Body"]`), hashed as
its bytes arrive, and parsed into its samples as it goes. `read_shard` only returns the samples once
the whole shard has been read and its sha256 and size match the manifest, so a corrupt shard never
reaches training, not even in part. A shard is small (~1 MB), so holding one is cheap.

The tar parser sees bytes before their sha256 is known, so it is bounded on any input: it never reads
more than the manifest's byte count of the shard plus one (a local file, an HTTP body or an S3 object
alike), every header and pax record must move forward, and every length (member, pax record) is checked
against what is left before it is used. A malformed shard is a `StorageError` naming it, in O(size)
time and memory. The standard library's `tarfile` ("r|") is not used: it is 2-4x slower here, and on
Python releases before the fix of CVE-2024-6232 (3.11.7 among them) a pax header of digits takes time
quadratic in its length (seconds for 32 KB), which no cap on the stream prevents.

Network errors that may pass (refused or reset connections, timeouts, HTTP 5xx/429, a body cut
short) are retried `Retry.tries` times with exponential backoff, re-reading the object from its
start; missing objects, denied access and corrupt data are not retried. The defaults come from
`PRETRAIN_DATA_TRIES` (3), `PRETRAIN_DATA_BACKOFF_S` (0.5) and `PRETRAIN_DATA_TIMEOUT_S` (60).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import IO, TypeVar

from trainer.errors import PretrainError
from trainer.s3 import NO_CREDENTIALS, client_error

T = TypeVar("T")

REMOTE_SCHEMES = ("http://", "https://", "s3://")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)
_READ_CHUNK = 1 << 18


class StorageError(PretrainError, OSError):
    """A shard or manifest cannot be read; the message names the location, `path` too."""


class _Transient(Exception):
    """A network error worth another try; wraps the message for the final report."""


@dataclass(frozen=True)
class Retry:
    """How hard to try a remote read before giving up."""

    tries: int = 3  # attempts in all, the first included
    backoff_s: float = 0.5  # sleep backoff_s * 2**k after failed try k
    timeout_s: float = 60.0  # connect/read timeout of one attempt

    @classmethod
    def from_env(cls) -> Retry:
        """The defaults, overridden by PRETRAIN_DATA_TRIES / _BACKOFF_S / _TIMEOUT_S."""
        env = os.environ
        try:
            return cls(
                tries=max(1, int(env.get("PRETRAIN_DATA_TRIES", cls.tries))),
                backoff_s=float(env.get("PRETRAIN_DATA_BACKOFF_S", cls.backoff_s)),
                timeout_s=float(env.get("PRETRAIN_DATA_TIMEOUT_S", cls.timeout_s)),
            )
        except ValueError as e:
            raise StorageError(f"bad PRETRAIN_DATA_* retry setting: {e}") from None


@dataclass(frozen=True)
class Sample:
    """One member of a shard: its WebDataset key and extension, and its bytes."""

    key: str
    ext: str
    data: bytes


def check_root(root: str) -> None:
    """Refuse roots the loader does not read: `pipe:` (a shell command) and unknown URL schemes."""
    m = _SCHEME.match(root)
    if m is None or root.startswith(REMOTE_SCHEMES):
        return
    scheme = m.group(1).lower()
    if scheme == "pipe":
        raise StorageError(
            f"data root {root!r} is refused: `pipe:` URLs run shell commands, which the loader never "
            "does; give a local directory, an http(s):// URL or an s3://bucket/prefix",
            field="data.path",
            path=root,
        )
    if "://" in root:
        raise StorageError(
            f"data root {root!r}: unsupported scheme {scheme}://; give a local directory, an http(s):// "
            "URL or an s3://bucket/prefix",
            field="data.path",
            path=root,
        )


def is_remote(root: str) -> bool:
    return root.startswith(REMOTE_SCHEMES)


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else os.path.join(root, name)


# ---- opening ----------------------------------------------------------------------------------


def _with_retries(where: str, retry: Retry, attempt: Callable[[], T]) -> T:
    """attempt() until it succeeds, raises StorageError, or `retry.tries` transient errors pass."""
    for k in range(retry.tries):
        try:
            return attempt()
        except _Transient as e:
            if k + 1 == retry.tries:
                raise StorageError(
                    f"cannot read {where} after {retry.tries} tries: {e}", path=where
                ) from None
            time.sleep(retry.backoff_s * 2**k)
    raise AssertionError("unreachable")


def _open_once(root: str, name: str, timeout_s: float) -> IO[bytes]:
    """One attempt at a binary stream of `root/name`; transient failures raise _Transient."""
    where = join(root, name)
    if root.startswith("s3://"):
        return _s3_open(where, timeout_s)
    if is_remote(root):
        try:
            return urllib.request.urlopen(where, timeout=timeout_s)  # noqa: S310 (http/https only)
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code == 429:
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            raise StorageError(f"cannot read {where}: HTTP {e.code} {e.reason}", path=where) from None
        except urllib.error.URLError as e:
            raise _Transient(f"{e.reason}") from None
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets
            raise _Transient(f"{type(e).__name__}: {e}") from None
    try:
        return open(where, "rb")
    except OSError as e:
        raise StorageError(f"cannot read {where}: {e.strerror or e}", path=where) from None


def open_stream(root: str, name: str, retry: Retry | None = None) -> IO[bytes]:
    """A binary stream for `root/name` (local, http(s) or s3), retrying transient network errors."""
    check_root(root)
    retry = retry or Retry.from_env()
    return _with_retries(join(root, name), retry, lambda: _open_once(root, name, retry.timeout_s))


def read_bytes(root: str, name: str, retry: Retry | None = None) -> bytes:
    """The whole of a small object (the manifest), retried as a unit on transient errors."""
    check_root(root)
    retry = retry or Retry.from_env()
    where = join(root, name)

    def attempt() -> bytes:
        with closing(_open_once(root, name, retry.timeout_s)) as f:
            try:
                return f.read()
            except Exception as e:
                _raise_read_error(where, e)
                raise

    return _with_retries(where, retry, attempt)


def read_text(root: str, name: str, retry: Retry | None = None) -> str:
    return read_bytes(root, name, retry).decode("utf-8")


def _raise_read_error(where: str, e: BaseException) -> None:
    """Classify an exception raised while reading a remote body (transient or not)."""
    if isinstance(e, (StorageError, _Transient)):
        return
    if isinstance(e, (OSError, http.client.HTTPException, socket.timeout)):
        raise _Transient(f"{type(e).__name__}: {e}") from None
    if type(e).__module__.startswith(("botocore", "urllib3")):
        raise _Transient(f"{type(e).__name__}: {e}") from None


# ---- S3 ---------------------------------------------------------------------------------------

_S3_LOCK = threading.Lock()
_S3_CLIENTS: dict[tuple, object] = {}


def _s3_client(timeout_s: float):
    """A boto3 S3 client, one per process and AWS configuration (boto3 clients are thread-safe)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageError(
            "reading s3:// data needs boto3, which is not installed: pip install 'pretrain[s3]' "
            "(the `s3` extra) or pip install boto3"
        ) from None
    env = os.environ
    key = (
        os.getpid(),
        timeout_s,
        *(
            env.get(k)
            for k in (
                "AWS_ENDPOINT_URL_S3",
                "AWS_ENDPOINT_URL",
                "AWS_PROFILE",
                "AWS_ACCESS_KEY_ID",
                "AWS_REGION",
            )
        ),
    )
    with _S3_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            # Retries are ours (one policy for http and s3), so botocore makes a single attempt.
            config = Config(
                connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1}
            )
            client = boto3.session.Session().client("s3", config=config)
            _S3_CLIENTS[key] = client
    return client


def _s3_open(url: str, timeout_s: float) -> IO[bytes]:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _, key = url[len("s3://") :].partition("/")
    client = _s3_client(timeout_s)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"]
    except NoCredentialsError:
        raise StorageError(f"cannot read {url}: {NO_CREDENTIALS}", path=url) from None
    except ClientError as e:
        code, status, line = client_error(e)
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
            raise _Transient(f"S3 {code} (HTTP {status})") from None
        raise StorageError(f"cannot read {url}: {line}", path=url) from None
    except BotoCoreError as e:  # endpoint unreachable, timeouts, dropped connections
        raise _Transient(f"{type(e).__name__}: {e}") from None


# ---- shards -----------------------------------------------------------------------------------


class _ShardFormatError(Exception):
    """The bytes are not a well-formed tar at this point; the caller adds shard and sample."""


class _TooLong(_ShardFormatError):
    """The stream holds more bytes than the manifest gives for the shard."""


class _HashingReader:
    """Chunks of a stream, hashed and counted as they arrive, never more than `limit` bytes.

    `limit` is the manifest's byte count of the shard (None: read to the stream's end). Reading stops
    there: one byte more is an error, so a local file, an HTTP body or an S3 object that grew (or a
    server that never stops sending) costs at most `limit + 1` bytes of reading."""

    def __init__(self, raw: IO[bytes], limit: int | None = None):
        self.raw, self.sha, self.limit = raw, hashlib.sha256(), limit
        self.nbytes = 0

    def chunk(self) -> bytes:
        """The next bytes of the stream (b"" at its end or at `limit`); _TooLong past `limit`."""
        want = _READ_CHUNK if self.limit is None else min(_READ_CHUNK, self.limit + 1 - self.nbytes)
        data = self.raw.read(want) if want > 0 else b""
        if data:
            self.sha.update(data)
            self.nbytes += len(data)
            if self.limit is not None and self.nbytes > self.limit:
                raise _TooLong(f"the stream goes on past the {self.limit} bytes the manifest gives")
        return data

    def drain(self) -> None:
        """Read (and hash) whatever is left: tar padding after the end-of-archive blocks."""
        while self.chunk():
            pass


_DECIMAL = re.compile(r"[0-9]{1,20}")


def _number(field: bytes) -> int:
    """A tar numeric header field, never negative: octal text, or GNU base-256 for large values."""
    if field[0] == 0x80:  # base-256, positive (0xff would be a negative number)
        return int.from_bytes(field[1:], "big")
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if digits.translate(None, b"01234567"):  # anything but octal digits: a sign, "_", "8", junk
        raise _ShardFormatError(f"bad numeric header field {field!r}")
    return int(digits or b"0", 8)


def _text(field: bytes, what: str) -> str:
    try:
        return field.decode("utf-8")
    except UnicodeDecodeError:
        raise _ShardFormatError(f"{what} is not UTF-8: {field[:40]!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """The `<length> <key>=<value>\\n` records of a pax header, each length checked to cover its
    record and to stay inside `data` (a record of length 0 must not stand still)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not (digits.isdigit() and len(digits) <= 20):
            raise _ShardFormatError(f"bad pax record at byte {pos}: no length")
        length = int(digits)
        end = pos + length
        if end <= space + 2 or end > len(data) or data[end - 1] != 0x0A:
            raise _ShardFormatError(
                f"bad pax record at byte {pos}: length {length} does not fit the header's {len(data)} bytes"
            )
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not (eq and key):
            raise _ShardFormatError(f"bad pax record at byte {pos}: no key=value")
        out[_text(key, "a pax key")] = _text(value, "a pax value")
        pos = end
    return out


def _member_size(header: bytes, pax: dict[str, str]) -> int:
    if "size" not in pax:
        return _number(header[124:136])
    if _DECIMAL.fullmatch(pax["size"]) is None:
        raise _ShardFormatError(f"bad pax size {pax['size'][:40]!r}")
    return int(pax["size"])


def _iter_tar(r: _HashingReader) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each regular file of a tar stream (ustar, pax or gnu headers).

    Parses from a window over the stream's chunks: one slice per header and per payload, no copies
    of the stream beyond the chunk being parsed. Bounded on any input: every header moves forward by
    at least one block, and a member longer than what is left of the shard's manifest size is refused
    before any of it is read, so a shard of n bytes costs O(n) time and memory whatever it holds."""
    buf, pos = b"", 0

    def window(need: int) -> bool:  # at least `need` bytes at buf[pos:], or False at the stream's end
        nonlocal buf, pos
        parts, have = [buf[pos:]], len(buf) - pos
        while have < need:
            data = r.chunk()
            if not data:
                break
            parts.append(data)
            have += len(data)
        buf, pos = b"".join(parts), 0
        return have >= need

    pax: dict[str, str] = {}
    longname: str | None = None
    while True:
        if len(buf) - pos < _TAR_BLOCK and not window(_TAR_BLOCK):
            raise _ShardFormatError(
                "unexpected end of data in a tar header" if len(buf) > pos else "no end-of-archive marker"
            )
        header = buf[pos : pos + _TAR_BLOCK]
        if header == _ZERO_BLOCK:
            return  # end of archive
        # The checksum counts its own 8 bytes as spaces.
        if _number(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * 32:
            raise _ShardFormatError("tar header checksum mismatch")
        size = _member_size(header, pax)
        end = _TAR_BLOCK + size + (-size % _TAR_BLOCK)
        if r.limit is not None:
            offset = r.nbytes - (len(buf) - pos)  # of this header in the shard
            if offset + end > r.limit:
                raise _ShardFormatError(
                    f"a member of {size} bytes at byte {offset} runs past the shard's {r.limit} bytes"
                )
        if len(buf) - pos < end and not window(end):
            raise _ShardFormatError(f"unexpected end of data (a member of {size} bytes is cut short)")
        payload = buf[pos + _TAR_BLOCK : pos + _TAR_BLOCK + size]
        pos += end
        kind = header[156:157]
        if kind == b"x":
            pax = _pax_records(payload)
            continue
        if kind == b"L":
            longname = _text(payload.rstrip(b"\0"), "a long name")
            continue
        if kind in (b"0", b"\0", b"7"):
            if longname is not None:
                name = longname
            elif "path" in pax:
                name = pax["path"]
            else:
                name = _text(header[:100].rstrip(b"\0"), "a member name")
                if header[257:262] == b"ustar" and header[345] != 0:
                    prefix = _text(header[345:500].rstrip(b"\0"), "a member name prefix")
                    name = f"{prefix}/{name}"
            yield name, payload
        pax, longname = {}, None  # 'g' global headers, directories, links: skipped


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset key and extension: `dir/000012.tokens` -> (`dir/000012`, `tokens`)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def _read_shard_once(
    root: str, name: str, sha256: str | None, size: int | None, timeout_s: float
) -> list[Sample]:
    where = join(root, name)
    samples: list[Sample] = []
    with closing(_open_once(root, name, timeout_s)) as raw:
        r = _HashingReader(raw, limit=size)
        try:
            for member, data in _iter_tar(r):
                key, ext = _split_name(member)
                samples.append(Sample(key, ext, data))
            r.drain()
        except _TooLong:
            raise StorageError(
                f"{where}: longer than the {size} bytes the manifest gives: the shard was extended or "
                "replaced after `pretrain prepare`; restore it or re-run prepare",
                path=where,
            ) from None
        except _ShardFormatError as e:
            # A clean end of a remote body is the object's end: http.client and botocore raise
            # (and we retry) when a connection drops before the announced Content-Length.
            n = len(samples)
            after = f", after key {samples[-1].key}" if samples else ""
            raise StorageError(
                f"{where}: truncated or corrupt shard at sample {n}{after}: {e} "
                f"(read {r.nbytes} bytes{f' of {size}' if size is not None else ''})",
                path=where,
            ) from None
        except Exception as e:
            if is_remote(root):
                _raise_read_error(where, e)
            raise StorageError(
                f"{where}: read failed after {len(samples)} samples: {e}", path=where
            ) from None
    if size is not None and r.nbytes != size:
        raise StorageError(
            f"{where}: {r.nbytes} bytes, the manifest says {size}: the shard was truncated or replaced "
            "after `pretrain prepare`; restore it or re-run prepare",
            path=where,
        )
    if sha256 is not None and r.sha.hexdigest() != sha256:
        raise StorageError(
            f"{where}: sha256 {r.sha.hexdigest()} does not match the manifest ({sha256}): the shard is "
            "corrupt or was replaced after `pretrain prepare`; restore it or re-run prepare "
            "(none of its samples were used)",
            path=where,
        )
    return samples


def read_shard(
    root: str,
    name: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    retry: Retry | None = None,
) -> list[Sample]:
    """Every member of one tar shard, in stored order, released only after the whole shard has been
    streamed and (when given) its sha256 and byte size match. Transient network errors re-read it."""
    check_root(root)
    retry = retry or Retry.from_env()
    return _with_retries(
        join(root, name), retry, lambda: _read_shard_once(root, name, sha256, size, retry.timeout_s)
    )


def open_shard(root: str, name: str, retry: Retry | None = None) -> Iterator[bytes]:
    """The `tokens` payload of each sample of one shard, in stored order (unverified)."""
    for s in read_shard(root, name, retry=retry):
        if s.ext == "tokens":
            yield s.data
