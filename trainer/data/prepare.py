"""`prepare()`, behind `pretrain prepare` (launch/prepare.py): raw text -> tokenizer -> fixed-length
token blocks -> WebDataset shards.

Output directory (`out`):

    tokenizer.json           HF `tokenizers` file (byte-level BPE, <|endoftext|> = EOS)
    train-000000.tar ...     WebDataset shards; sample key = global block index (9 digits),
    val-000000.tar ...       member `<key>.tokens` = block_len little-endian uint16/uint32 ids
    manifest.json            written last: the dataset is valid iff it exists and checks out

Documents are tokenized in the order of the input files' sorted paths, each followed by EOS,
concatenated into one stream and cut into blocks of exactly `block_len` tokens (the tail that does
not fill a block is dropped). The last `val_blocks` blocks form the "val" split. Everything is built
in a work directory next to `out` and moved in at the end, so an interrupted run leaves no manifest
that lies; the work is resumable units (cleaning: trainer/data/curate.py; tokenize and shards:
trainer/data/pipeline.py) that run here (threads, or processes for cleaning) or as Ray tasks
(cluster/prepare.py), with the same output.

When the tokenizer is trained here without cleaning stages, the inputs are read twice (train, then
tokenize) rather than held in memory; URLs are therefore fetched twice. With cleaning stages the
inputs are read once, into the clean units' files.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.data import pipeline
from trainer.data.clean import CleanRecipe, make_recipe
from trainer.data.curate import (
    Curated,
    clean_name,
    clean_unit,
    decide,
    kept_texts,
    removed_tokens_unit,
    sourced,
)
from trainer.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo, write_manifest
from trainer.data.pipeline import Runner, local_runner
from trainer.data.report import REPORT_JSON, REPORT_PNG, QualityReport
from trainer.errors import PretrainError
from trainer.fsutil import fsync_dir, sha256_file

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_NAME = "tokenizer.json"
TEXT_EXTENSIONS = (".txt", ".md", ".py", ".rst")
JSONL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_EXTENSIONS = (".parquet",)
# 256 byte symbols + <|endoftext|>: anything smaller cannot encode arbitrary bytes.
MIN_VOCAB_SIZE = 257
# Tokenization work unit: big enough to amortize IPC, small enough to keep workers busy.
_BATCH_DOCS = 256
_BATCH_CHARS = 1 << 20
_URL_TIMEOUT_S = 60
# Plain JSON Lines files over this many bytes are several tokenize units, so one big file spreads.
UNIT_BYTES = 1 << 26


class PrepareError(PretrainError, ValueError):
    """Bad input or option for `pretrain prepare`; the message names the file or option (`path`,
    `field`)."""


@dataclass(frozen=True)
class _Options:
    """What `prepare` was asked for, passed whole to its stages."""

    tokenizer: str | None
    vocab_size: int
    block_len: int
    samples_per_shard: int
    val_blocks: int | None
    text_field: str
    workers: int | None  # None: every CPU core
    max_docs: int | None
    tokenizer_sample_docs: int | None
    clean: CleanRecipe = CleanRecipe()  # cleaning + dedup stages; empty: none (the default)


# ---- entry point ------------------------------------------------------------------------------


def prepare(
    inputs: list[str],
    out: str,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    block_len: int = 2049,
    samples_per_shard: int = 256,
    val_blocks: int | None = None,
    text_field: str = "text",
    workers: int | None = None,
    max_docs: int | None = None,
    tokenizer_sample_docs: int | None = None,
    filters: str | None = None,
    dedup: str | None = None,
    recipe: str | None = None,
    overwrite: bool = False,
    runner: Runner | None = None,
) -> Manifest:
    """Tokenize `inputs` into WebDataset shards under `out`; returns the manifest written last.

    `filters` ("gopher_quality,c4"), `dedup` ("exact,near") and `recipe` (a YAML file) switch on
    the cleaning stages (trainer/data/clean.py); with any of them a quality report is written too.
    The work runs as resumable units (trainer/data/curate.py, trainer/data/pipeline.py) on `runner`
    (default: this machine's `workers` cores); the output is the same whoever runs them.
    """
    start = time.monotonic()
    opts = _Options(
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        block_len=block_len,
        samples_per_shard=samples_per_shard,
        val_blocks=val_blocks,
        text_field=text_field,
        workers=workers,
        max_docs=max_docs,
        tokenizer_sample_docs=tokenizer_sample_docs,
        clean=make_recipe(filters, dedup, recipe),
    )
    _check_options(opts)
    out = os.path.abspath(out)
    _check_out_dir(out, overwrite)
    # Sorted: the output does not depend on the order the inputs are listed in.
    sources = sorted(resolve_inputs(inputs))
    inputs = sorted(inputs)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    manifest, report = _prepare_units(
        out, inputs, sources, opts, runner or local_runner(opts.workers or os.cpu_count() or 1)
    )
    _print_summary(manifest, out, time.monotonic() - start, report)
    return manifest


def _prepare_units(
    out: str, inputs: list[str], sources: list[str], opts: _Options, runner: Runner
) -> tuple[Manifest, QualityReport | None]:
    """Tokenizer, units and manifest in the work directory of these inputs and options, then moved
    into `out`. A run killed before the end leaves the work directory; the same command resumes it."""
    work = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.prepare-{_work_key(sources, opts)}")
    os.makedirs(work, exist_ok=True)
    progress = _Progress()
    try:
        manifest, report = _build_units(work, inputs, sources, opts, progress, runner)
        names = [s.name for split in manifest.splits.values() for s in split.shards] + [TOKENIZER_NAME]
        if report is not None:
            names += report.write(work)
        _commit(work, out, names, manifest)
    except PrepareError:
        shutil.rmtree(work, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    finally:
        progress.done()
    shutil.rmtree(work, ignore_errors=True)
    return manifest, report


def _work_key(sources: list[str], opts: _Options) -> str:
    """Hash of what the output depends on: the inputs (local files: size and mtime too) and the
    options (a given tokenizer: its sha256), not the worker count."""
    files = [
        (s, os.stat(s).st_size, os.stat(s).st_mtime_ns) if not _is_url(s) and os.path.isfile(s) else (s,)
        for s in sources
    ]
    fields = {k: v for k, v in opts.__dict__.items() if k not in ("workers", "clean")}
    if opts.clean.enabled:
        fields["clean"] = opts.clean.to_dict()
    if opts.tokenizer and os.path.isfile(opts.tokenizer):
        fields["tokenizer"] = sha256_file(opts.tokenizer)
    blob = json.dumps([files, fields, UNIT_BYTES, _tool_version()], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _build_units(
    work: str, inputs: list[str], sources: list[str], opts: _Options, progress: _Progress, runner: Runner
) -> tuple[Manifest, QualityReport | None]:
    """Clean units and the dedup decision (with cleaning stages), tokenizer, one tokenize unit per
    input, one unit per shard, and the sealed manifest, in `work`; and the quality report when
    cleaning stages ran. Units finished by an earlier run (their records) are not run again."""
    tok_path = os.path.join(work, TOKENIZER_NAME)
    reads = _unit_reads(sources, opts.text_field)
    unit_records = [
        pipeline.read_record(os.path.join(work, pipeline.unit_name(i) + ".json")) for i in range(len(reads))
    ]
    cleaned = [
        pipeline.read_record(os.path.join(work, clean_name(i) + ".json"))
        for i in range(len(reads) if opts.clean.enabled else 0)
    ]
    if os.path.exists(tok_path) or any(r is not None for r in cleaned):
        shard_records = [
            n for n in os.listdir(work) if n.startswith(("train-", "val-")) and n.endswith(".json")
        ]
        what = f"{sum(r is not None for r in cleaned)}/{len(reads)} units cleaned, " if cleaned else ""
        print(
            f"[prepare] resuming {work}: {what}{sum(r is not None for r in unit_records)}/{len(reads)} input units "
            f"tokenized, {len(shard_records)} shards written",
            file=sys.stderr,
            flush=True,
        )
    curated = None
    max_docs = opts.max_docs
    if opts.clean.enabled:
        curated = _clean(work, reads, sources, opts, progress, runner)
        # The tokenize units read the kept documents of the clean units (--max-docs applied there).
        reads = [
            functools.partial(kept_texts, work, i, curated.unit_keep(i)) for i in range(len(curated.counts))
        ]
        max_docs = None
    if os.path.exists(tok_path):
        tok = Tokenizer.from_file(tok_path)
        tokenizer_source = _tokenizer_source(opts)
    else:
        tok, tokenizer_source = _make_tokenizer(sources, tok_path + ".partial", opts, progress, curated)
        os.replace(tok_path + ".partial", tok_path)
    eos_id = tok.token_to_id(EOS_TOKEN)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"

    # Tokenize: units in input order; with --max-docs, units after the one reaching it are not used.
    used: list[tuple[int, int]] = []
    n_docs = n_tokens = 0
    units = [(work, i, read, tok_path, eos_id, dtype) for i, read in enumerate(reads)]
    results = runner(pipeline.tokenize_unit, units)
    limit = np.iinfo(_np_dtype(dtype)).max
    try:
        for i, record in enumerate(results):
            if record["max_id"] > limit:
                raise PrepareError(
                    f"tokenizer produced id {record['max_id']}, which does not fit {dtype}",
                    field="--tokenizer",
                )
            left = None if max_docs is None else max_docs - n_docs
            docs, tokens = pipeline.used_tokens(work, i, record, left)
            used.append((i, tokens))
            n_docs += docs
            n_tokens += tokens
            progress.update("tokenizing", docs=docs, tokens=tokens)
            if left is not None and n_docs >= max_docs:
                break
    finally:
        results.close()
        progress.done()
    n_blocks, n_val = _count_blocks(inputs, n_docs, n_tokens, opts)
    n_train = n_blocks - n_val
    if curated is not None:
        reasons = curated.unit_reasons()
        removed = [
            (work, i, curated.inputs[i], curated.unit_keep(i), reasons[i], tok_path)
            for i in range(len(curated.counts))
        ]
        for counts in runner(removed_tokens_unit, removed):
            for stage, n in counts.items():
                curated.report.stage(stage).tokens += n

    # Shards: blocks of the stream, `samples_per_shard` each, train first.
    bl, per = opts.block_len, opts.samples_per_shard
    jobs = []
    for split, lo, hi in (("train", 0, n_train), ("val", n_train, n_blocks)):
        for k, first in enumerate(range(lo, hi, per)):
            n = min(per, hi - first)
            pieces = pipeline.shard_pieces(used, first * bl, (first + n) * bl)
            jobs.append((split, (work, f"{split}-{k:06d}.tar", first, n, bl, dtype, pieces)))
    shards: dict[str, list[ShardInfo]] = {"train": [], "val": []}
    for (split, _), record in zip(
        jobs, runner(pipeline.write_shard, [args for _, args in jobs]), strict=True
    ):
        shards[split].append(ShardInfo(**record))
        progress.update("writing shards", shards=1)
    splits = {
        "train": SplitInfo(shards=shards["train"], samples=n_train, tokens=n_train * bl),
        "val": SplitInfo(shards=shards["val"], samples=n_val, tokens=n_val * bl),
    }
    progress.done()
    source: dict[str, Any] = {
        "inputs": inputs,
        "documents": n_docs,
        "tokens": n_tokens,
        "dropped_tail_tokens": n_tokens - n_blocks * bl,
        "text_field": opts.text_field,
        "max_docs": opts.max_docs,
        "tokenizer": tokenizer_source,
        "tool_version": _tool_version(),
    }
    if curated is None:
        return _manifest(dtype, bl, vocab, eos_id, tok_path, splits, source), None
    # Only with cleaning on, so the quick start's manifest (and fingerprint) stay as they were.
    source["cleaning"] = curated.report.recipe
    # Tokens per kept document: the tokenize units' per-document counts.
    doc_tokens = [np.fromfile(os.path.join(work, pipeline.unit_name(i) + ".docs"), "<u4") for i, _ in used]
    curated.report.kept_tokens = np.concatenate(doc_tokens)
    return _manifest(dtype, bl, vocab, eos_id, tok_path, splits, source), curated.report


def _manifest(
    dtype: str, block_len: int, vocab: int, eos_id: int, tok_path: str, splits: dict, source: dict
) -> Manifest:
    """The sealed manifest of a prepared corpus."""
    return Manifest(
        version=1,
        dtype=dtype,
        block_len=block_len,
        vocab_size=vocab,
        eos_id=eos_id,
        tokenizer_file=TOKENIZER_NAME,
        tokenizer_sha256=sha256_file(tok_path),
        splits=splits,
        source=source,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    ).seal()


def _clean(
    work: str,
    reads: list[Callable[[], Iterator[str]]],
    sources: list[str],
    opts: _Options,
    progress: _Progress,
    runner: Runner,
) -> Curated:
    """The clean units (filters and dedup keys, one per tokenize unit's input) on `runner`, in input
    order up to --max-docs input documents; then the dedup decision over them, here."""
    index = {s: k for k, s in enumerate(sources)}
    args = [
        (work, i, functools.partial(sourced, index[read.args[0]], read), opts.clean)  # type: ignore[attr-defined]
        for i, read in enumerate(reads)
    ]
    results = runner(clean_unit, args, gil_bound=True)
    units = seen = 0
    try:
        for record in results:
            units += 1
            seen += record["documents"]
            progress.update("cleaning", docs=record["documents"])
            if opts.max_docs is not None and seen >= opts.max_docs:
                break
    finally:
        results.close()
    progress.done()  # the runner's next lines start on their own line
    progress.reset()
    curated = decide(work, units, opts.clean, sources, opts.max_docs)
    report = curated.report
    if report.input_documents and not curated.keep.any():
        removed = ", ".join(f"{name} {r.documents}" for name, r in report.removed.items())
        raise PrepareError(
            f"the cleaning stages removed all {report.input_documents} documents ({removed}); "
            "loosen the thresholds (--recipe) or drop filters",
            field="--filters",
        )
    return curated


def _make_tokenizer(
    sources: list[str], tok_path: str, opts: _Options, progress: _Progress, curated: Curated | None = None
) -> tuple[Tokenizer, dict[str, Any]]:
    """The given tokenizer (copied to `tok_path`) or one trained on the inputs (the kept documents
    when cleaning ran); and how it was made."""
    if opts.tokenizer:
        return _load_tokenizer(opts.tokenizer, tok_path), {"file": opts.tokenizer}
    sample = opts.tokenizer_sample_docs
    if curated:
        docs = curated.documents(sample)
    else:
        if opts.max_docs is not None:
            sample = min(opts.max_docs, sample or opts.max_docs)
        docs = iter_documents(sources, opts.text_field, sample)
    tok = _train_tokenizer(docs, opts.vocab_size, progress)
    tok.save(tok_path)
    return tok, _tokenizer_source(opts)


def _tokenizer_source(opts: _Options) -> dict[str, Any]:
    """How the tokenizer was made, for the manifest."""
    if opts.tokenizer:
        return {"file": opts.tokenizer}
    return {"trained": {"vocab_size": opts.vocab_size, "sample_docs": opts.tokenizer_sample_docs}}


def _count_blocks(inputs: list[str], n_docs: int, n_tokens: int, opts: _Options) -> tuple[int, int]:
    """(blocks, of which val) the token stream gives; refused when it gives no train block."""
    if n_docs == 0:
        raise PrepareError(
            f"inputs {inputs} contain no documents (empty files or no {opts.text_field!r} values)",
            field="inputs",
        )
    n_blocks = n_tokens // opts.block_len
    n_val = opts.val_blocks if opts.val_blocks is not None else max(1, n_blocks // 200)
    if n_blocks < n_val + 1:
        raise PrepareError(
            f"too little text: {n_docs} documents gave {n_tokens} tokens = {n_blocks} block(s) of "
            f"--block-len {opts.block_len}, but one train block + --val-blocks {n_val} are needed; "
            "add input or lower --block-len",
            field="--block-len",
        )
    return n_blocks, n_val


def _print_summary(manifest: Manifest, out: str, seconds: float, report: QualityReport | None = None) -> None:
    if report is not None:
        for line in report.summary_lines():
            print(line, file=sys.stderr)
        print(f"[prepare] quality report: {os.path.join(out, REPORT_JSON)}, {REPORT_PNG}", file=sys.stderr)
    train, val = manifest.splits["train"], manifest.splits["val"]
    n_shards = sum(len(s.shards) for s in manifest.splits.values())
    print(
        f"[prepare] done: {manifest.source['documents']:,} documents, {manifest.source['tokens']:,} tokens, "
        f"{train.samples:,} train + {val.samples:,} val blocks of {manifest.block_len}, {n_shards} shards, "
        f"{seconds:.1f}s -> {out}",
        file=sys.stderr,
        flush=True,
    )


# ---- inputs -----------------------------------------------------------------------------------


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Expand inputs to an ordered list of files and URLs (each directory/glob sorted, no duplicates)."""
    if not inputs:
        raise PrepareError("no inputs given: pass files, directories, globs or http(s) URLs", field="inputs")
    resolved: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        if _is_url(item):
            found = [item]
        elif os.path.isdir(item):
            found = _walk(item)
            if not found:
                raise PrepareError(f"input directory {item} has no {_known_extensions()} files", path=item)
        elif os.path.isfile(item):
            found = [item]
        elif any(c in item for c in "*?["):
            import glob

            found = []
            for match in sorted(glob.glob(item, recursive=True)):
                found.extend(_walk(match) if os.path.isdir(match) else [match])
            if not found:
                raise PrepareError(f"input glob {item} matched no files", path=item)
        else:
            raise PrepareError(
                f"input {item} does not exist (not a file, directory, glob or http(s) URL)", path=item
            )
        for f in found:
            key = f if _is_url(f) else os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                resolved.append(f)
    return resolved


def iter_documents(sources: Iterable[str], text_field: str, max_docs: int | None = None) -> Iterator[str]:
    """Yield non-empty documents from resolved sources in order, at most `max_docs`."""
    for _, doc in _iter_sourced(sources, text_field, max_docs):
        yield doc


def _iter_sourced(sources: Iterable[str], text_field: str, max_docs: int | None) -> Iterator[tuple[int, str]]:
    """(index of the source, document) for `iter_documents`' documents."""
    if max_docs is not None and max_docs < 1:
        return
    count = 0
    for index, source in enumerate(sources):
        for doc in _read_source(source, text_field):
            if not doc:
                continue
            count += 1
            yield index, doc
            if max_docs is not None and count >= max_docs:
                return  # before opening the next file or URL


def _unit_reads(sources: list[str], text_field: str) -> list[Callable[[], Iterator[str]]]:
    """The tokenize units' readers: one per input, except plain JSON Lines files over UNIT_BYTES,
    cut at line starts into pieces of about UNIT_BYTES (a constant: units never depend on workers)."""
    reads: list[Callable[[], Iterator[str]]] = []
    for s in sources:
        size = 0 if _is_url(s) or not s.lower().endswith(".jsonl") else os.path.getsize(s)
        if size > UNIT_BYTES:
            reads += [
                functools.partial(_read_jsonl_range, s, text_field, a, min(a + UNIT_BYTES, size))
                for a in range(0, size, UNIT_BYTES)
            ]
        else:
            reads.append(functools.partial(_read_source, s, text_field))
    return reads


def _read_jsonl_range(location: str, text_field: str, start: int, stop: int) -> Iterator[str]:
    """Documents of the lines of a plain JSON Lines file that start in bytes [start, stop)."""
    try:
        with open(location, "rb") as f:
            if start:
                f.seek(start - 1)
                f.readline()  # the line that starts before `start` belongs to the previous range
            begin = f.tell()
            if begin >= stop:  # a line from the previous range runs through all of this one
                return
            f.seek(stop - 1)
            f.readline()  # through the end of the line that starts before `stop`
            end = f.tell()
            f.seek(begin)
            data = io.BytesIO(f.read(end - begin))
        # Line numbers in messages count from the range's first line.
        yield from _read_jsonl(f"{location} (from byte {begin})", data, text_field)
    except PrepareError:
        raise
    except (OSError, UnicodeError, ValueError) as e:
        raise PrepareError(f"cannot read input {location}: {e}", path=location) from e


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _known_extensions() -> str:
    return " ".join(TEXT_EXTENSIONS + JSONL_EXTENSIONS + PARQUET_EXTENSIONS)


def _walk(root: str) -> list[str]:
    """Files under `root` with a known extension, sorted; hidden files and directories skipped."""
    exts = TEXT_EXTENSIONS + JSONL_EXTENSIONS + PARQUET_EXTENSIONS
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(exts)
        )
    return sorted(found)


def _path_of(location: str) -> str:
    """The part of a file path or URL whose ending tells the format (a URL's query is ignored)."""
    return urllib.parse.urlparse(location).path if _is_url(location) else location


def _format_of(location: str) -> str:
    name = _path_of(location).lower()
    if name.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if name.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    return "text"


def _read_source(location: str, text_field: str) -> Iterator[str]:
    """Documents of one file or URL; read errors become PrepareError naming it."""
    fmt = _format_of(location)
    try:
        with _open_binary(location) as raw:
            if fmt == "text":
                yield raw.read().decode("utf-8", errors="replace")
            elif fmt == "jsonl":
                yield from _read_jsonl(location, raw, text_field)
            else:
                yield from _read_parquet(location, raw, text_field)
    except PrepareError:
        raise
    except (OSError, EOFError, UnicodeError, ValueError) as e:
        # gzip/zstd/http errors surface here mid-stream; name the file, not a library internals line.
        raise PrepareError(f"cannot read input {location}: {e}", path=location) from e


def _open_binary(location: str) -> IO[bytes]:
    if _is_url(location):
        try:
            return urllib.request.urlopen(location, timeout=_URL_TIMEOUT_S)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PrepareError(f"cannot fetch input {location}: {e}", path=location) from e
    try:
        return open(location, "rb")
    except OSError as e:
        raise PrepareError(f"cannot read input file {location}: {e.strerror or e}", path=location) from e


def _read_jsonl(location: str, raw: IO[bytes], text_field: str) -> Iterator[str]:
    name = _path_of(location).lower()
    stream: IO[bytes]
    if name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=raw)
    elif name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise PrepareError(
                f"input {location} is zstd-compressed: install `zstandard` (pip install zstandard) to read it",
                path=location,
            ) from None
        stream = zstandard.ZstdDecompressor().stream_reader(raw)
    else:
        stream = raw
    for lineno, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8", errors="replace"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{location}:{lineno}: invalid JSON ({e.msg})", path=location) from None
        if not isinstance(record, dict) or text_field not in record:
            raise PrepareError(
                f"{location}:{lineno}: no {text_field!r} field (set --text-field)",
                field="--text-field",
                path=location,
            )
        text = record[text_field]
        if _is_text(text, location, f"{location}:{lineno}: field {text_field!r}"):
            yield text


def _read_parquet(location: str, raw: IO[bytes], text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(
            f"input {location} is Parquet: install `pyarrow` (pip install pyarrow) to read it",
            path=location,
        ) from None
    # Parquet needs random access; a URL's body is buffered in memory.
    parquet = pq.ParquetFile(raw if raw.seekable() else io.BytesIO(raw.read()))
    if text_field not in parquet.schema_arrow.names:
        raise PrepareError(
            f"{location}: no column {text_field!r} (columns: {parquet.schema_arrow.names}; set --text-field)",
            field="--text-field",
            path=location,
        )
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if _is_text(text, location, f"{location}: column {text_field!r}"):
                yield text


def _is_text(value: Any, location: str, what: str) -> bool:
    """True for a document's text, False for a missing one (None); anything else is refused."""
    if value is None:
        return False
    if not isinstance(value, str):
        raise PrepareError(f"{what} is {type(value).__name__}, not a string", path=location)
    return True


# ---- tokenizer --------------------------------------------------------------------------------


def _train_tokenizer(docs: Iterator[str], vocab_size: int, progress: _Progress) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with <|endoftext|> at id 0."""
    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) must give back text exactly, block boundaries included.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def counted() -> Iterator[str]:
        for doc in docs:
            progress.update("training tokenizer", docs=1)
            yield doc

    tok.train_from_iterator(counted(), trainer)
    progress.reset()
    return tok


def _load_tokenizer(path: str, copy_to: str) -> Tokenizer:
    """Load a given tokenizer.json, check it has <|endoftext|>, and copy the file byte-for-byte."""
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for unreadable/invalid files
        raise PrepareError(
            f"--tokenizer {path}: cannot load as a tokenizers JSON file ({e})", field="--tokenizer", path=path
        ) from e
    if tok.token_to_id(EOS_TOKEN) is None:
        raise PrepareError(
            f"--tokenizer {path}: has no {EOS_TOKEN} token, which prepare uses as the document separator (EOS)",
            field="--tokenizer",
            path=path,
        )
    shutil.copyfile(path, copy_to)
    return tok


# ---- commit -----------------------------------------------------------------------------------


def _commit(tmp: str, out: str, names: list[str], manifest: Manifest) -> None:
    """Move the new files into `out`, replacing only ours, and write the manifest last."""
    os.makedirs(out, exist_ok=True)
    # The old manifest goes first: from here until the new one lands, `out` has no commit record.
    old_manifest = os.path.join(out, MANIFEST_NAME)
    if os.path.exists(old_manifest):
        os.remove(old_manifest)
    for name in os.listdir(out):
        if name.endswith(".tar") or name in (TOKENIZER_NAME, REPORT_JSON, REPORT_PNG):
            os.remove(os.path.join(out, name))
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    fsync_dir(out)
    write_manifest(out, manifest)


# ---- small pieces -----------------------------------------------------------------------------


def _check_options(o: _Options) -> None:
    if o.block_len < 2:
        raise PrepareError(
            f"--block-len must be >= 2 (inputs + shifted targets), got {o.block_len}", field="--block-len"
        )
    if o.samples_per_shard < 1:
        raise PrepareError(
            f"--samples-per-shard must be >= 1, got {o.samples_per_shard}", field="--samples-per-shard"
        )
    if o.val_blocks is not None and o.val_blocks < 1:
        raise PrepareError(
            f"--val-blocks must be >= 1 (the val split cannot be empty), got {o.val_blocks}",
            field="--val-blocks",
        )
    for option, value in (
        ("--workers", o.workers),
        ("--max-docs", o.max_docs),
        ("--tokenizer-sample-docs", o.tokenizer_sample_docs),
    ):
        if value is not None and value < 1:
            raise PrepareError(f"{option} must be >= 1, got {value}", field=option)
    if not o.tokenizer and o.vocab_size < MIN_VOCAB_SIZE:  # a given tokenizer brings its own vocabulary
        raise PrepareError(
            f"--vocab-size {o.vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + {EOS_TOKEN})",
            field="--vocab-size",
        )


def _check_out_dir(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {out} exists and is not a directory", field="--out", path=out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise PrepareError(
            f"--out {out} is not empty; pass --overwrite to replace its shards (*.tar), manifest.json "
            "and tokenizer.json (other files are kept)",
            field="--overwrite",
            path=out,
        )


def _np_dtype(dtype: str) -> np.dtype:
    return np.dtype("<u2" if dtype == "uint16" else "<u4")


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pretrain {version('pretrain')}"
    except PackageNotFoundError:
        return "pretrain unknown"


class _Progress:
    """One stderr line, rewritten at most once a second."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.start = time.monotonic()
        self.last = self.start  # runs shorter than a second print only the summary
        self.docs = self.tokens = self.shards = 0
        self.shown = False

    def update(self, phase: str, *, docs: int = 0, tokens: int = 0, shards: int = 0) -> None:
        self.docs += docs
        self.tokens += tokens
        self.shards += shards
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return
        self.last = now
        rate = self.tokens / max(now - self.start, 1e-9)
        line = (
            f"[prepare] {phase}: {self.docs:,} docs, {self.tokens:,} tokens, {rate:,.0f} tok/s, "
            f"{self.shards} shards"
        )
        sys.stderr.write(f"\r{line:<100}")
        sys.stderr.flush()
        self.shown = True

    def reset(self) -> None:
        """Start counting afresh (the tokenizer pass and the tokenize pass read the same documents)."""
        self.docs = self.tokens = self.shards = 0
        self.start = time.monotonic()

    def done(self) -> None:
        """End the progress line so the next output starts on its own line."""
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.shown = False
