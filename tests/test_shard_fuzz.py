"""Hostile and corrupt shards: a real shard written by `pretrain prepare`, mutated (the defects found
by hand, then a hypothesis fuzz over byte flips, truncations, insertions, deletions and header-field
rewrites). Every read ends within a second, in bounded memory, with the shard's samples or a
`StorageError` naming the shard; with the manifest's sha256 and size, only the untouched shard reads."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import re
import signal
import tarfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.data_fixtures import http_server, identity_corpus
from trainer.data.storage import Retry, StorageError, read_shard

BLOCK = 9
FAST = Retry(tries=1, backoff_s=0.0, timeout_s=5)
TIME_LIMIT_S = 1.0  # a malformed shard is refused within a second


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the reader swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    def alarm(signum, frame):
        raise _Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fix_checksum(data: bytearray, header: int) -> None:
    """Recompute a tar header's checksum, so a rewritten field gets past the checksum test."""
    data[header + 148 : header + 156] = b" " * 8
    data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])


class Shard:
    """The bytes of a real shard, where its headers are, and a directory to write mutations to."""

    def __init__(self, path: Path, work: Path):
        self.data = path.read_bytes()
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        with tarfile.open(path) as tar:
            members = list(tar)
        # prepare writes each sample as a pax header ('x', with its record block) + a ustar header.
        self.pax_headers = [m.offset for m in members]
        self.file_headers = [m.offset_data - 512 for m in members]
        self.root, self.name = str(work), "s.tar"
        self.where = f"{work}/{self.name}"

    def write(self, data: bytes) -> None:
        Path(self.where).write_bytes(data)


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Shard:
    base = tmp_path_factory.mktemp("fuzz")
    identity_corpus(base / "corpus", train_blocks=8, samples_per_shard=4, block_len=BLOCK)
    (base / "work").mkdir()
    return Shard(base / "corpus" / "train-000000.tar", base / "work")


def _read(shard: Shard, data: bytes, *, sha256: str | None, size: int | None):
    """read_shard of `data` within the time limit: its samples, or the StorageError it raised."""
    shard.write(data)
    try:
        with _time_limit(TIME_LIMIT_S):
            return read_shard(shard.root, shard.name, sha256=sha256, size=size, retry=FAST)
    except _Hang:
        raise AssertionError(
            f"reading a {len(data)}-byte shard did not end within {TIME_LIMIT_S} s"
        ) from None
    except StorageError as e:
        # Named and classified: not the catch-all "read failed" of an unexpected exception.
        assert str(e).startswith(f"{shard.where}: ") and e.path == shard.where, str(e)
        assert any(r in str(e) for r in _REASONS), str(e)
        return e


# What a StorageError about a shard's bytes says (storage.py); "read failed", the message of an
# exception nobody expected, is not among them.
_REASONS = (
    "does not match the manifest",  # sha256
    "bytes, the manifest says",  # shorter than the manifest's size
    "longer than the",  # longer than the manifest's size
    "bad pax record",
    "bad pax size",
    "bad numeric header field",
    "tar header checksum mismatch",
    "is not UTF-8",
    "runs past the shard's",
    "unexpected end of data",
    "no end-of-archive marker",
)


# ---- the defects found by hand --------------------------------------------------------------------


def _pax_length_zero(s: Shard) -> bytes:
    d = bytearray(s.data)
    record = s.pax_headers[1] + 512
    assert d[record : record + 2] == b"13"  # "13 mtime=0.0\n"
    d[record : record + 2] = b"0 "
    return bytes(d)


def _negative_size(s: Shard) -> bytes:
    d = bytearray(s.data)
    h = s.file_headers[1]
    d[h + 124 : h + 136] = b"-0000001000\0"  # -512: the old reader re-read this header forever
    _fix_checksum(d, h)
    return bytes(d)


def _negative_pax_size(s: Shard) -> bytes:
    d = bytearray(s.data)
    record = s.pax_headers[1] + 512
    d[record : record + 13] = b"13 size=-512\n"  # the old reader yielded an empty member here
    return bytes(d)


def _huge_size(s: Shard) -> bytes:
    d = bytearray(s.data)
    h = s.file_headers[1]
    d[h + 124 : h + 136] = b"\x80" + (1 << 80).to_bytes(11, "big")  # GNU base-256: 1.2e24 bytes
    _fix_checksum(d, h)
    return bytes(d)


def _pax_digits(s: Shard) -> bytes:
    # A 64 KB pax header of digits: tarfile before CVE-2024-6232's fix spends seconds on it.
    n = 64 * 1024
    d = bytearray(s.data)
    h = s.pax_headers[0]
    d[h + 124 : h + 136] = b"%011o\0" % n
    _fix_checksum(d, h)
    return bytes(d[: h + 512] + b"1" * n + d[h + 1024 :])


@pytest.mark.parametrize(
    "mutate, error",
    [
        (_pax_length_zero, r"sample 1, after key 0+: bad pax record at byte 0: length 0"),
        (_negative_size, r"sample 1, after key 0+: bad numeric header field b'-0000001000"),
        (_negative_pax_size, r"sample 1, after key 0+: bad pax size '-512'"),
        (_huge_size, r"sample 1, after key 0+: .*a member of 1208925819614629174706176 bytes (at|is cut)"),
        (_pax_digits, r"sample 0: bad pax record at byte 0: no length"),
    ],
    ids=["pax-length-0", "negative-size", "negative-pax-size", "huge-size", "64KB-pax-of-digits"],
)
def test_hostile_headers_are_refused_fast_naming_the_shard_and_sample(shard, mutate, error):
    data = mutate(shard)
    hostile_manifest = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    for verify in ({"sha256": None, "size": None}, hostile_manifest):
        e = _read(shard, data, **verify)  # within TIME_LIMIT_S
        assert isinstance(e, StorageError), "a hostile shard was read"
        assert e.args[0].startswith(f"{shard.where}: truncated or corrupt shard at ")
        assert re.search(error, str(e)), str(e)
    # With the real manifest's size the reader stops at its byte count whatever the file holds.
    e = _read(shard, data, sha256=shard.sha256, size=len(shard.data))
    assert isinstance(e, StorageError)


def test_a_shard_longer_than_the_manifest_says_is_refused_without_reading_it_all(shard):
    e = _read(shard, shard.data + bytes(8 << 20), sha256=shard.sha256, size=len(shard.data))
    assert isinstance(e, StorageError)
    assert f"longer than the {len(shard.data)} bytes the manifest gives" in str(e)


class _EndlessHandler(http.server.BaseHTTPRequestHandler):
    """A server that sends a shard, then zeros for ever (no Content-Length): a hostile or broken host."""

    shard_bytes = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(self.shard_bytes)
            while True:
                self.wfile.write(bytes(1 << 16))

    def log_message(self, *args) -> None:
        pass


def test_a_remote_body_is_capped_at_the_manifests_size(shard, tmp_path):
    handler = type("Handler", (_EndlessHandler,), {"shard_bytes": shard.data})

    def factory(*args, directory=None, **kw):
        return handler(*args, **kw)

    with http_server(str(tmp_path), handler=factory) as url, _time_limit(5.0):
        t0 = time.perf_counter()
        with pytest.raises(StorageError, match=rf"^{url}/s.tar: longer than the {len(shard.data)} bytes"):
            read_shard(url, "s.tar", sha256=shard.sha256, size=len(shard.data), retry=FAST)
        assert time.perf_counter() - t0 < TIME_LIMIT_S


# ---- fuzz -----------------------------------------------------------------------------------------

_NUMBERS = st.one_of(
    st.sampled_from(
        [b"0", b"-1", b"-0000001000", b"+17", b"1_0", b"9", b"0x10", b" ", b"", b"77777777777", b"1e3"]
        + [b"\xff" * 12, b"\x80" + (1 << 80).to_bytes(11, "big"), b"\x80" + bytes(11), b"\xff" + bytes(11)]
    ),
    st.integers(0, 1 << 33).map(lambda n: b"%o" % n),
    st.binary(max_size=12),
)
_FIELDS = {"name": (0, 100), "size": (124, 12), "checksum": (148, 8), "type": (156, 1), "magic": (257, 6)}
_PAX_LENGTHS = st.one_of(
    st.sampled_from([b"0", b"1", b"-5", b"99999999999999999999", b"999999999999999999999999", b"x", b""]),
    st.integers(0, 4096).map(lambda n: b"%d" % n),
)
_PAX_KEYS = st.sampled_from([b"size", b"path", b"mtime", b"linkpath", b"hdrcharset", b"", b"=", b"s\xffze"])
_PAX_VALUES = st.one_of(
    st.sampled_from([b"-1", b"-1024", b"0", b"18", b"1e3", b" 18", b"\xd9\xa1\xd9\xa8", b"9" * 5000]),
    st.binary(max_size=40),
)


class _Edit:
    """One edit of a shard's bytes; its repr is what hypothesis prints for a failing case."""

    def __init__(self, what: str, apply: Callable[[bytearray], None]):
        self.what, self.apply = what, apply

    def __repr__(self) -> str:
        return self.what


@st.composite
def _edit(draw, shard: Shard) -> _Edit:
    n = len(shard.data)
    # Header-field and pax rewrites twice as often: they get past the checksum, deep into the parser.
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "field", "field", "pax", "pax"]))
    if kind == "flip":
        at, mask = draw(st.integers(0, n - 1)), draw(st.integers(1, 255))

        def edit(d):
            if at < len(d):
                d[at] ^= mask

        return _Edit(f"flip byte {at} ^ {mask:#x}", edit)
    if kind == "truncate":
        at = draw(st.integers(0, n - 1))
        return _Edit(f"truncate at {at}", lambda d: d.__delitem__(slice(at, None)))
    if kind == "insert":
        at = draw(st.integers(0, n))
        junk = draw(st.one_of(st.binary(min_size=1, max_size=1100), st.just(bytes(512))))
        return _Edit(
            f"insert {junk[:20]!r}... ({len(junk)} bytes) at {at}",
            lambda d: d.__setitem__(slice(at, at), junk),
        )
    if kind == "delete":
        at, k = draw(st.integers(0, n - 1)), draw(st.integers(1, 1100))
        return _Edit(f"delete {k} bytes at {at}", lambda d: d.__delitem__(slice(at, at + k)))
    if kind == "field":
        h = draw(st.sampled_from(shard.pax_headers + shard.file_headers))
        field = draw(st.sampled_from(sorted(_FIELDS)))
        value, fix = draw(_NUMBERS), draw(st.booleans())
        start, width = _FIELDS[field]
        value = (value + bytes(width))[:width]

        def edit(d):
            if h + 512 <= len(d):
                d[h + start : h + start + width] = value
                if fix and field != "checksum":
                    _fix_checksum(d, h)

        return _Edit(f"header at {h}: {field} = {value.rstrip(bytes(1))!r} (checksum fixed: {fix})", edit)
    h = draw(st.sampled_from(shard.pax_headers))
    record = draw(_PAX_LENGTHS) + b" " + draw(_PAX_KEYS) + b"=" + draw(_PAX_VALUES) + b"\n"
    record = record * draw(st.integers(1, 3))
    fix_size = draw(st.booleans())

    def edit(d):
        # The record replaces the pax header's payload block (one 512-byte block, padding included).
        body = (record + bytes(-len(record) % 512)) if fix_size else record[:512].ljust(512, b"\0")
        d[h + 512 : h + 1024] = body
        if fix_size:
            d[h + 124 : h + 136] = b"%011o\0" % len(record)
            _fix_checksum(d, h)

    return _Edit(f"pax header at {h}: {record[:60]!r}... (size fixed: {fix_size})", edit)


FUZZ_EXAMPLES = 2500


def _reason(e: StorageError) -> str:
    """What the error says is wrong, without numbers: for hypothesis's statistics."""
    return next(r for r in _REASONS if r in str(e))


@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,  # the same cases on every run: CI is reproducible
    database=None,
    deadline=None,  # the time bound is our own alarm: TIME_LIMIT_S per read, hang or not
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=st.data())
def test_fuzzed_shards_end_fast_in_bounded_memory_with_samples_or_a_named_error(shard, case):
    what = case.draw(st.lists(_edit(shard), min_size=1, max_size=3), label="edits")
    d = bytearray(shard.data)
    for edit in what:
        edit.apply(d)
    data = bytes(d)
    budget = (1 << 20) + 4 * len(data)  # peak bytes of one read: a few copies of the shard, and slack
    hostile = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    for verify in (
        {"sha256": shard.sha256, "size": len(shard.data)},
        hostile,
        {"sha256": None, "size": None},
    ):
        tracemalloc.start()
        try:
            out = _read(shard, data, **verify)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < budget, f"{what}: {peak} bytes allocated"
        if verify["sha256"] == shard.sha256 and not isinstance(out, StorageError):
            # The real manifest lets only the untouched bytes through: every edit that leaves a valid
            # tar (a flip in token data, in a name, in padding) is a sha256 mismatch.
            assert data == shard.data, what
        # `pytest --hypothesis-show-statistics` shows how the cases ended.
        verified = (
            "manifest" if verify["sha256"] == shard.sha256 else "hostile" if verify["sha256"] else "none"
        )
        event(f"{verified}: " + (_reason(out) if isinstance(out, StorageError) else "read"))
