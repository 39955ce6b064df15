"""The cleaning and dedup stages of `pretrain prepare`, before the tokenizer sees any text.

Per unit (an input, or a piece of a big one; any process or Ray task, like the tokenize units of
trainer/data/pipeline.py): each document goes through the recipe's filters (pure functions of its
text, trainer/data/clean.py) and the survivors get their dedup keys (trainer/data/dedup.py). The
unit's files are written to temporary names and renamed, then its completion record, so a killed
preparation redoes only the units without one:

    clean-000003.jsonl            kept documents, [source index, cleaned text] per line
    clean-000003.removed.jsonl    what the filters took, [input ordinal, filter, rule, before, after]
    clean-000003.npz              per input document: characters; per kept one: input ordinal,
                                  characters, content / exact keys, LSH band keys
    clean-000003.json             the record {documents, kept}: the unit is done iff it exists

Then one deterministic step over every unit's keys (`decide`, on the driver) marks the documents
kept; the tokenizer and the tokenize units read the kept documents back (`kept_texts`); and, with
the final tokenizer, one more unit per clean unit counts the tokens each stage removed from it
(`removed_tokens_unit`, record clean-000003.removed-tokens.json), for the report.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from trainer.data import pipeline
from trainer.data.clean import CleanRecipe
from trainer.data.dedup import DedupResult, MinHasher, content_key, exact_key, find_duplicates, shingles
from trainer.data.report import QualityReport

# Work unit of the per-document stages inside a unit: big enough to amortize IPC, small enough to spread.
_BATCH_DOCS = 256
_BATCH_CHARS = 1 << 20


def clean_name(index: int) -> str:
    return f"clean-{index:06d}"


@dataclass
class Curated:
    """The kept documents of units 0..len(counts)-1 and the report so far."""

    work: str
    counts: list[int]
    """Lines of each unit's clean-N.jsonl that count (all of them, unless --max-docs cut)."""
    inputs: list[int]
    """Input documents of each unit that count."""
    keep: np.ndarray
    """(sum(counts),) bool over those lines, in unit order."""
    dedup_reason: dict[int, str]
    """Line (index into `keep`) dedup removed -> "exact_dedup" / "near_dedup"."""
    report: QualityReport

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """(units + 1,) index into `keep` of each unit's first line, and the total."""
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])

    def unit_keep(self, index: int) -> np.ndarray:
        """`keep` of unit `index`'s lines."""
        return self.keep[self.offsets[index] : self.offsets[index + 1]]

    def documents(self, limit: int | None = None) -> Iterator[str]:
        """The kept documents' cleaned text, in input order, at most `limit`."""
        docs = (t for i in range(len(self.counts)) for t in kept_texts(self.work, i, self.unit_keep(i)))
        yield from docs if limit is None else (t for _, t in zip(range(limit), docs, strict=False))

    def unit_reasons(self) -> list[dict[int, str]]:
        """`dedup_reason` per unit, its lines numbered from the unit's first line."""
        found: list[dict[int, str]] = [{} for _ in self.counts]
        for i, reason in self.dedup_reason.items():
            unit = int(np.searchsorted(self.offsets, i, side="right")) - 1
            found[unit][i - int(self.offsets[unit])] = reason
        return found


@dataclass(frozen=True)
class Outcome:
    """What the per-document stages made of one document (a pure function of its text)."""

    source: int
    characters: int
    """Of the document as read."""
    text: str | None
    """The cleaned text, None when a filter removed the document."""
    changes: tuple[tuple[str, str, str, str], ...]
    """(filter, rule, text before, text after; "" when removed) for each filter that removed or
    shortened the document."""
    content: int = 0
    exact: int = 0
    bands: np.ndarray | None = None


def analyse(docs: list[tuple[int, str]], recipe: CleanRecipe) -> list[Outcome]:
    """The per-document stages for a batch of (source index, text): filters, then dedup keys.
    Pure: the same batch gives the same outcomes in any process, so batches can go to any worker."""
    dd = recipe.dedup
    hasher = MinHasher(dd.bands, dd.rows, dd.shingle_words, dd.seed) if dd.near else None
    outcomes = []
    for source, text in docs:
        changes = []
        kept: str | None = text
        for f in recipe.filters:
            after, rule = f(kept)
            if after is None:
                changes.append((f.name, rule, kept, ""))
                kept = None
                break
            if after != kept:  # lines dropped (C4)
                changes.append((f.name, f"{f.name}_lines", kept, after))
            kept = after
        if kept is None:
            outcomes.append(Outcome(source, len(text), None, tuple(changes)))
            continue
        outcomes.append(
            Outcome(
                source,
                len(text),
                kept,
                tuple(changes),
                content=content_key(kept),
                exact=exact_key(kept) if dd.exact else 0,
                bands=hasher.band_keys(kept) if hasher is not None else None,
            )
        )
    return outcomes


def clean_unit(
    work: str,
    index: int,
    read: Callable[[], Iterator[tuple[int, str]]],
    recipe: CleanRecipe,
    threads: int = 1,
) -> dict[str, int]:
    """Filters and dedup keys of the documents `read()` yields ((source index, text)), as unit
    `index` in `work`; returns its record {documents, kept}. With `threads` > 1 the batches go to
    that many processes (the filters are Python, held by the GIL)."""
    stem = os.path.join(work, clean_name(index))
    done = pipeline.read_record(stem + ".json")
    if done is not None:
        return done
    dd = recipe.dedup
    input_chars: list[int] = []
    kept_keys: list[tuple[int, int, int, int, int]] = []  # ordinal, source, chars, content, exact
    bands: list[np.ndarray] = []
    with (
        open(stem + ".jsonl.partial", "w", encoding="utf-8") as kept,
        open(stem + ".removed.jsonl.partial", "w", encoding="utf-8") as removed,
    ):
        for outcomes in _ordered_batches(_batches(d for d in read() if d[1]), recipe, threads):
            for o in outcomes:
                ordinal = len(input_chars)
                input_chars.append(o.characters)
                for name, rule, before, after in o.changes:
                    removed.write(json.dumps([ordinal, name, rule, before, after], ensure_ascii=False) + "\n")
                if o.text is None:
                    continue
                kept_keys.append((ordinal, o.source, len(o.text), o.content, o.exact))
                if o.bands is not None:
                    bands.append(o.bands)
                kept.write(json.dumps([o.source, o.text], ensure_ascii=False) + "\n")
        for f in (kept, removed):
            f.flush()
            os.fsync(f.fileno())
    cols = np.array(kept_keys, dtype=np.uint64).reshape(len(kept_keys), 5)
    with open(stem + ".npz.partial", "wb") as f:
        np.savez(
            f,
            input_chars=np.array(input_chars, dtype=np.int64),
            ordinal=cols[:, 0].astype(np.int64),
            source=cols[:, 1].astype(np.int64),
            chars=cols[:, 2].astype(np.int64),
            content=cols[:, 3],
            exact=cols[:, 4],
            bands=np.array(bands, dtype=np.uint64).reshape(len(kept_keys), dd.bands if dd.near else 0),
        )
        f.flush()
        os.fsync(f.fileno())
    for ext in (".jsonl", ".removed.jsonl", ".npz"):
        os.replace(stem + ext + ".partial", stem + ext)
    record = {"documents": len(input_chars), "kept": len(kept_keys)}
    pipeline._record(stem + ".json", record)  # through the module: tests hook it
    return record


def decide(
    work: str, units: int, recipe: CleanRecipe, sources: Sequence[str], max_docs: int | None = None
) -> Curated:
    """The dedup decision over the finished clean units 0..units-1 of `work` (only their first
    `max_docs` input documents in all), and the report of what the filters and dedup removed."""
    report = QualityReport(recipe=recipe.to_dict(), sources=list(sources))
    dd = recipe.dedup
    # Every stage in the report, in recipe order, even when it removed nothing.
    for name in [f.name for f in recipe.filters] + ["exact_dedup"] * dd.exact + ["near_dedup"] * dd.near:
        report.stage(name)
    counts: list[int] = []
    inputs: list[int] = []
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("source", "chars", "content", "exact", "bands")}
    left = max_docs
    for i in range(units):
        with np.load(_path(work, i, ".npz")) as z:
            n_in = len(z["input_chars"]) if left is None else min(left, len(z["input_chars"]))
            k = int(np.searchsorted(z["ordinal"], n_in))  # kept documents among the first n_in
            report.input_documents += n_in
            report.input_characters += int(z["input_chars"][:n_in].sum())
            for key, got in cols.items():
                got.append(z[key][:k])
        for ordinal, name, rule, before, after in _read_lines(_path(work, i, ".removed.jsonl")):
            if ordinal >= n_in:
                break
            _record_change(report, name, rule, before, after)
        counts.append(k)
        inputs.append(n_in)
        if left is not None:
            left -= n_in
            if left <= 0:
                break
    n = sum(counts)
    chars = np.concatenate(cols["chars"]).tolist()
    srcs = np.concatenate(cols["source"]).tolist()
    result = find_duplicates(
        np.concatenate(cols["content"]),
        np.concatenate(cols["exact"]) if dd.exact else None,
        np.concatenate(cols["bands"]).reshape(n, dd.bands) if dd.near else None,
        (lambda ids: _shingles_of(work, counts, ids, dd.shingle_words)) if dd.confirm else None,
        dd.jaccard,
    )
    _record_dedup(result, chars, report)
    keep = result.keep
    report.kept_characters = [c for c, k in zip(chars, keep, strict=True) if k]
    report.kept_sources = [s for s, k in zip(srcs, keep, strict=True) if k]
    return Curated(work, counts, inputs, keep, result.reason, report)


def removed_tokens_unit(
    work: str,
    index: int,
    n_inputs: int,
    keep: np.ndarray,
    reasons: dict[int, str],
    tokenizer: str,
    threads: int = 1,
) -> dict[str, int]:
    """Tokens (of the final tokenizer, file `tokenizer`) each stage removed from unit `index`'s first
    `n_inputs` input documents, for the report: {stage: tokens}. Filters: the tokens of the text
    before minus after; dedup (`keep` and `reasons` over the unit's lines): all the document's."""
    path = _path(work, index, ".removed-tokens.json")
    done = pipeline.read_record(path)
    if done is not None:
        return done
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # our threads, not Rayon's, use the cores given
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    tok.encode_special_tokens = True  # as the tokenize units encode

    def items() -> Iterator[tuple[str, str, str]]:
        for ordinal, stage, _, before, after in _read_lines(_path(work, index, ".removed.jsonl")):
            if ordinal >= n_inputs:
                return
            yield stage, before, after
        lines = itertools.islice(_read_lines(_path(work, index, ".jsonl")), len(keep))
        for i, (_, text) in enumerate(lines):
            if not keep[i]:
                yield reasons[i], text, ""

    def count(chunk: list[tuple[str, str, str]]) -> list[tuple[str, int]]:
        before = tok.encode_batch_fast([b for _, b, _ in chunk], add_special_tokens=False)
        after = tok.encode_batch_fast([a for _, _, a in chunk], add_special_tokens=False)
        return [(st, len(b.ids) - len(a.ids)) for (st, _, _), b, a in zip(chunk, before, after, strict=True)]

    counts: dict[str, int] = {}
    pending = items()
    chunks = iter(lambda: list(itertools.islice(pending, 256)), [])  # lists of 256 until one is empty
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for pairs in pool.map(count, chunks):
            for stage, n in pairs:
                counts[stage] = counts.get(stage, 0) + n
    pipeline._record(path, counts)  # through the module: tests hook it
    return counts


def curate(
    docs: Iterable[tuple[int, str]], recipe: CleanRecipe, sources: Sequence[str], work: str, workers: int = 1
) -> Curated:
    """Clean and dedup `docs` ((source index, text) in input order) as one unit in `work`."""
    clean_unit(work, 0, lambda: iter(docs), recipe, threads=workers)
    return decide(work, 1, recipe, sources)


def kept_texts(work: str, index: int, keep: np.ndarray) -> Iterator[str]:
    """The texts of unit `index`'s lines where `keep` (its first len(keep) lines) is True."""
    for (_, text), k in zip(_read_lines(_path(work, index, ".jsonl")), keep, strict=False):
        if k:
            yield text


def sourced(source: int, read: Callable[[], Iterator[str]]) -> Iterator[tuple[int, str]]:
    """(source, document) for the documents of `read()`: a clean unit's reader."""
    return ((source, doc) for doc in read())


def _record_change(report: QualityReport, name: str, rule: str, before: str, after: str) -> None:
    """What a filter took from a document, into the report."""
    stage = report.stage(name)
    if rule == f"{name}_lines":  # shortened: the dropped lines count
        stage.characters += len(before) - len(after)
    else:
        stage.documents += 1
        stage.characters += len(before)
    stage.rules[rule] = stage.rules.get(rule, 0) + 1


def _batches(docs: Iterable[tuple[int, str]]) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _ordered_batches(
    batches: Iterator[list[tuple[int, str]]], recipe: CleanRecipe, workers: int
) -> Iterator[list[Outcome]]:
    """`analyse` of each batch, in input order, with at most 2 x workers batches in flight."""
    if workers <= 1:
        for batch in batches:
            yield analyse(batch, recipe)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may already run Rayon/OpenMP threads (as in prepare's tokenizer pool).
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(analyse, batch, recipe))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _record_dedup(result: DedupResult, chars: list[int], report: QualityReport) -> None:
    for i, stage_name in sorted(result.reason.items()):
        stage = report.stage(stage_name)
        stage.documents += 1
        stage.characters += chars[i]
        stage.rules[stage_name] = stage.rules.get(stage_name, 0) + 1
    report.cluster_sizes = result.cluster_sizes


def _shingles_of(work: str, counts: list[int], ids: Sequence[int], n: int) -> dict[int, set[str]]:
    """Shingle sets of the kept lines `ids` (sorted indices over the units' counted lines)."""
    wanted = iter(ids)
    target = next(wanted, None)
    found: dict[int, set[str]] = {}
    for i, (_, text) in enumerate(_lines(work, counts)):
        if target is None:
            break
        if i == target:
            found[i] = set(shingles(text, n))
            target = next(wanted, None)
    return found


def _lines(work: str, counts: list[int]) -> Iterator[list]:
    """The counted lines of the units' clean-N.jsonl, in unit order."""
    for unit, count in enumerate(counts):
        yield from itertools.islice(_read_lines(_path(work, unit, ".jsonl")), count)


def _path(work: str, index: int, ext: str) -> str:
    return os.path.join(work, clean_name(index) + ext)


def _read_lines(path: str) -> Iterator[list]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
