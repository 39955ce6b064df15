"""The cleaning and dedup pass of `pretrain prepare`, before the tokenizer sees any text.

One read of the inputs: each document goes through the recipe's filters (pure functions of its
text, trainer/data/clean.py); the survivors' cleaned text is written to a temporary JSON Lines file
with their dedup keys kept in memory (trainer/data/dedup.py). Then one deterministic dedup step
marks the documents kept. The tokenizer and the tokenization pass read the kept documents back
from that file, so the inputs are read once and cleaned once.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from trainer.data.clean import CleanRecipe
from trainer.data.dedup import DedupResult, MinHasher, content_key, exact_key, find_duplicates, shingles
from trainer.data.report import QualityReport

# Temporary files in prepare's work directory: kept text, and what the filters took.
CLEANED_NAME = "cleaned.jsonl"
REMOVED_NAME = "removed.jsonl"
# Work unit of the per-document stages: big enough to amortize IPC, small enough to spread.
_BATCH_DOCS = 256
_BATCH_CHARS = 1 << 20


@dataclass
class Curated:
    """The kept documents (lines of `path` where `keep` is True) and the report so far."""

    path: str
    removed_path: str
    keep: np.ndarray
    dedup_reason: dict[int, str]
    """Line of `path` dedup removed -> "exact_dedup" / "near_dedup"."""
    report: QualityReport

    def documents(self, limit: int | None = None) -> Iterator[str]:
        """The kept documents' cleaned text, in input order, at most `limit`."""
        count = 0
        for i, (_, text) in enumerate(_read_lines(self.path)):
            if limit is not None and count >= limit:
                return
            if self.keep[i]:
                count += 1
                yield text

    def count_removed_tokens(self, encode: Callable[[list[str]], list[int]], batch: int = 256) -> None:
        """Tokens removed by each stage, with the final tokenizer (`encode`: texts -> token counts)."""
        # Documents the filters removed or shortened: tokens of what was there minus what is left.
        pending: list[tuple[str, str, str]] = []
        for stage, before, after in _read_lines(self.removed_path):
            pending.append((stage, before, after))
            if len(pending) >= batch:
                self._add_tokens(pending, encode)
                pending = []
        # Documents dedup removed: all their tokens.
        for i, (_, text) in enumerate(_read_lines(self.path)):
            if not self.keep[i]:
                pending.append((self.dedup_reason[i], text, ""))
                if len(pending) >= batch:
                    self._add_tokens(pending, encode)
                    pending = []
        if pending:
            self._add_tokens(pending, encode)

    def _add_tokens(
        self, items: list[tuple[str, str, str]], encode: Callable[[list[str]], list[int]]
    ) -> None:
        before = encode([b for _, b, _ in items])
        after = encode([a for _, _, a in items])
        for (stage, _, _), nb, na in zip(items, before, after, strict=True):
            self.report.stage(stage).tokens += nb - na


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


def curate(
    docs: Iterable[tuple[int, str]],
    recipe: CleanRecipe,
    sources: Sequence[str],
    workdir: str,
    progress: Callable[[int], None] = lambda n: None,
    workers: int = 1,
) -> Curated:
    """Clean and dedup `docs` ((source index, text) in input order) into files under `workdir`,
    the per-document stages on `workers` processes (the result does not depend on it)."""
    report = QualityReport(recipe=recipe.to_dict(), sources=list(sources))
    dd = recipe.dedup
    # Every stage in the report, in recipe order, even when it removed nothing.
    for name in [f.name for f in recipe.filters] + ["exact_dedup"] * dd.exact + ["near_dedup"] * dd.near:
        report.stage(name)
    contents: list[int] = []
    exacts: list[int] = []
    bands: list[np.ndarray] = []
    chars: list[int] = []
    srcs: list[int] = []
    path = os.path.join(workdir, CLEANED_NAME)
    removed_path = os.path.join(workdir, REMOVED_NAME)
    with open(path, "w", encoding="utf-8") as out, open(removed_path, "w", encoding="utf-8") as removed:
        for outcomes in _ordered_batches(_batches(docs), recipe, workers):
            progress(len(outcomes))
            for o in outcomes:
                report.input_documents += 1
                report.input_characters += o.characters
                _record_changes(o, report, removed)
                if o.text is None:
                    continue
                contents.append(o.content)
                exacts.append(o.exact)
                if o.bands is not None:
                    bands.append(o.bands)
                chars.append(len(o.text))
                srcs.append(o.source)
                out.write(json.dumps([o.source, o.text], ensure_ascii=False) + "\n")

    n = len(contents)
    result = find_duplicates(
        np.array(contents, dtype=np.uint64),
        np.array(exacts, dtype=np.uint64) if dd.exact else None,
        np.array(bands, dtype=np.uint64).reshape(n, dd.bands) if dd.near else None,
        (lambda ids: _shingles_of(path, ids, dd.shingle_words)) if dd.confirm else None,
        dd.jaccard,
    )
    _record_dedup(result, chars, report)
    keep = result.keep
    report.kept_characters = [c for c, k in zip(chars, keep, strict=True) if k]
    report.kept_sources = [s for s, k in zip(srcs, keep, strict=True) if k]
    return Curated(path=path, removed_path=removed_path, keep=keep, dedup_reason=result.reason, report=report)


def _record_changes(o: Outcome, report: QualityReport, removed) -> None:
    """What each filter took from the document, into the report and the removed file."""
    for name, rule, before, after in o.changes:
        stage = report.stage(name)
        if rule == f"{name}_lines":  # shortened: the dropped lines count
            stage.characters += len(before) - len(after)
        else:
            stage.documents += 1
            stage.characters += len(before)
        stage.rules[rule] = stage.rules.get(rule, 0) + 1
        removed.write(json.dumps([name, before, after], ensure_ascii=False) + "\n")


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


def _shingles_of(path: str, ids: Sequence[int], n: int) -> dict[int, set[str]]:
    """Shingle sets of the cleaned documents `ids` (sorted), read back from `path`."""
    wanted = iter(ids)
    target = next(wanted, None)
    found: dict[int, set[str]] = {}
    for i, (_, text) in enumerate(_read_lines(path)):
        if target is None:
            break
        if i == target:
            found[i] = set(shingles(text, n))
            target = next(wanted, None)
    return found


def _read_lines(path: str) -> Iterator[list]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
