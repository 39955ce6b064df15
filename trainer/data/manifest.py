"""The dataset manifest: the commit record of a prepared token dataset.

`pretrain prepare` writes `manifest.json` last, so a dataset directory is valid because its manifest
exists and checks out, never because shards exist. The manifest lists every shard with its sample
count, size and sha256, the tokenizer's sha256, and a fingerprint over all of it.

Layout (JSON, one object):

    version, dtype, block_len, vocab_size, eos_id, tokenizer_file, tokenizer_sha256,
    splits: {"train": {shards: [{name, samples, tokens, bytes, sha256}], samples, tokens}, "val": ...},
    source: {inputs, documents, text_field, tokenizer, tool_version},
    created: ISO-8601 time of writing,
    fingerprint: first 16 hex chars of sha256 over the canonical JSON of every field except
                 `fingerprint` and `created`.

Shard names and `tokenizer_file` are plain relative paths inside the dataset root (no absolute path,
no `..`): anyone can re-seal a manifest, so the fingerprint does not stop a forged one from pointing
a reader elsewhere, and the parser refuses such names whatever the fingerprint says.

`created` is left out of the fingerprint on purpose: two runs over the same data with the same
options produce the same fingerprint, so the fingerprint identifies the data, not the run.
Remote roots (http/s3) are loaded elsewhere; this module reads local directories and parses text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from trainer.errors import PretrainError
from trainer.fsutil import write_bytes_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
DTYPES = ("uint16", "uint32")
SPLITS = ("train", "val")
# Fields outside the fingerprint (see module docstring).
_UNFINGERPRINTED = ("fingerprint", "created")
# One part of a file name in the manifest: what `prepare` writes (`train-000000.tar`), never `.`/`..`.
_NAME_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class ManifestError(PretrainError, ValueError):
    """A manifest is missing, malformed, inconsistent or was modified after it was written; `path`
    is the manifest file."""


@dataclass
class ShardInfo:
    """One WebDataset tar shard of a split."""

    name: str  # file name relative to the dataset root, e.g. "train-000000.tar"
    samples: int  # number of blocks in the shard
    tokens: int  # samples * block_len
    bytes: int  # size of the tar file
    sha256: str  # hex sha256 of the tar file


@dataclass
class SplitInfo:
    """The shards of one split ("train" or "val"), in order."""

    shards: list[ShardInfo]
    samples: int
    tokens: int


@dataclass
class Manifest:
    """Everything a loader needs to trust and read a prepared dataset."""

    version: int  # manifest format version; only 1 exists
    dtype: str  # token storage dtype, "uint16" or "uint32", little-endian
    block_len: int  # tokens per sample
    vocab_size: int  # tokenizer vocabulary size, special tokens included
    eos_id: int  # id of <|endoftext|>, appended after every document
    tokenizer_file: str  # tokenizer file name relative to the root, "tokenizer.json"
    tokenizer_sha256: str  # hex sha256 of that file
    splits: dict[str, SplitInfo]  # "train" and "val"
    source: dict[str, Any]  # inputs, documents, text_field, tokenizer, tool_version
    fingerprint: str = ""  # see module docstring; filled by `seal()`
    created: str = ""  # ISO-8601 time the manifest was written; not fingerprinted

    def compute_fingerprint(self) -> str:
        """The sha256 (first 16 hex chars) of the canonical JSON of all fingerprinted fields."""
        body = {k: v for k, v in self._as_dict().items() if k not in _UNFINGERPRINTED}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def seal(self) -> Manifest:
        """Set `fingerprint` from the current contents; returns self."""
        self.fingerprint = self.compute_fingerprint()
        return self

    def to_json(self) -> str:
        """Pretty JSON with a trailing newline (the fingerprint must already be set)."""
        return json.dumps(self._as_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and validate manifest JSON; `where` names its origin in error messages."""
        try:
            return _parse_checked(text, where)
        except ManifestError as e:
            e.path = e.path or where  # the parse helpers name a field; the error names the file too
            raise

    def _as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_checked(text: str, where: str) -> Manifest:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON ({e})") from e
    manifest = _parse_manifest(raw, where)
    expected = manifest.compute_fingerprint()
    if manifest.fingerprint != expected:
        raise ManifestError(
            f"{where}: fingerprint mismatch (recorded {manifest.fingerprint}, contents give "
            f"{expected}): the manifest was modified after `pretrain prepare` wrote it; "
            "re-run `pretrain prepare` instead of editing it"
        )
    _check_consistency(manifest, where)
    return manifest


def load_manifest(root: str) -> Manifest:
    """Read and validate `<root>/manifest.json` from a local directory."""
    path = os.path.join(root, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ManifestError(
            f"{path} not found: run `pretrain prepare` first to create the dataset in {root} "
            "(a directory without a manifest is an incomplete or interrupted prepare)",
            path=path,
        ) from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e})", path=path) from e
    return Manifest.from_json(text, path)


def write_manifest(root: str, manifest: Manifest) -> str:
    """Atomically write `<root>/manifest.json` (temp file + fsync + rename); returns its path."""
    path = os.path.join(root, MANIFEST_NAME)
    write_bytes_atomic(path, manifest.to_json().encode("utf-8"))
    return path


# ---- validation -------------------------------------------------------------------------------


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is an int subclass; a count of `true` is still wrong.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _get_file_name(obj: dict[str, Any], key: str, where: str) -> str:
    """A file of the corpus, read as `<root>/<name>` (a path or a URL): a plain relative path inside
    the root, so that a manifest (which anyone can re-seal) never points a reader outside it."""
    value = _get(obj, key, str, where)
    if value.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", value):
        problem = "is an absolute path"
    elif ".." in re.split(r"[/\\]", value):
        problem = "leaves the corpus with '..'"
    elif not all(_NAME_PART.fullmatch(part) for part in value.split("/")):
        problem = "is not a plain relative path"
    else:
        return value
    raise ManifestError(
        f"{where}: field {key!r} {problem}: {value!r}; the manifest's files must be plain relative paths "
        "inside the corpus (letters, digits, '.', '_', '-', parts joined by '/', none starting with '.'), "
        "as `pretrain prepare` writes them; re-run prepare"
    )


def _get_count(obj: dict[str, Any], key: str, where: str) -> int:
    value = _get(obj, key, int, where)
    if value < 0:
        raise ManifestError(f"{where}: field {key!r} must be >= 0, got {value}")
    return value


def _parse_manifest(raw: Any, where: str) -> Manifest:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    known = {f.name for f in fields(Manifest)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {unknown}")
    version = _get(raw, "version", int, where)
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"{where}: manifest version {version} is not supported (this tool reads version "
            f"{MANIFEST_VERSION}); re-run `pretrain prepare` with this version"
        )
    dtype = _get(raw, "dtype", str, where)
    if dtype not in DTYPES:
        raise ManifestError(f"{where}: field 'dtype' must be one of {DTYPES}, got {dtype!r}")
    splits_raw = _get(raw, "splits", dict, where)
    missing = [s for s in SPLITS if s not in splits_raw]
    if missing:
        raise ManifestError(f"{where}: splits is missing {missing}")
    splits = {name: _parse_split(value, f"{where}: splits.{name}") for name, value in splits_raw.items()}
    return Manifest(
        version=version,
        dtype=dtype,
        block_len=_get_count(raw, "block_len", where),
        vocab_size=_get_count(raw, "vocab_size", where),
        eos_id=_get_count(raw, "eos_id", where),
        tokenizer_file=_get_file_name(raw, "tokenizer_file", where),
        tokenizer_sha256=_get(raw, "tokenizer_sha256", str, where),
        splits=splits,
        source=_get(raw, "source", dict, where),
        fingerprint=_get(raw, "fingerprint", str, where),
        created=_get(raw, "created", str, where),
    )


def _parse_split(raw: Any, where: str) -> SplitInfo:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object, got {type(raw).__name__}")
    shards_raw = _get(raw, "shards", list, where)
    shards = []
    for i, s in enumerate(shards_raw):
        at = f"{where}.shards[{i}]"
        if not isinstance(s, dict):
            raise ManifestError(f"{at}: expected an object, got {type(s).__name__}")
        shards.append(
            ShardInfo(
                name=_get_file_name(s, "name", at),
                samples=_get_count(s, "samples", at),
                tokens=_get_count(s, "tokens", at),
                bytes=_get_count(s, "bytes", at),
                sha256=_get(s, "sha256", str, at),
            )
        )
    return SplitInfo(
        shards=shards, samples=_get_count(raw, "samples", where), tokens=_get_count(raw, "tokens", where)
    )


def _check_consistency(m: Manifest, where: str) -> None:
    """Counts that must agree; run after the fingerprint so edits are reported as such."""
    if m.block_len < 2:
        raise ManifestError(f"{where}: block_len must be >= 2, got {m.block_len}")
    if not m.eos_id < m.vocab_size:
        raise ManifestError(f"{where}: eos_id {m.eos_id} is outside vocab_size {m.vocab_size}")
    if m.dtype == "uint16" and m.vocab_size > 1 << 16:
        raise ManifestError(f"{where}: dtype uint16 cannot hold vocab_size {m.vocab_size}")
    for name, split in m.splits.items():
        at = f"{where}: splits.{name}"
        for s in split.shards:
            if s.tokens != s.samples * m.block_len:
                raise ManifestError(f"{at}: shard {s.name} has tokens != samples * block_len")
        if split.samples != sum(s.samples for s in split.shards):
            raise ManifestError(f"{at}: samples != sum of its shards' samples")
        if split.tokens != split.samples * m.block_len:
            raise ManifestError(f"{at}: tokens != samples * block_len")
