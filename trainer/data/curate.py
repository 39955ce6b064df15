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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from trainer.data.clean import CleanRecipe
from trainer.data.dedup import DedupResult, MinHasher, content_key, exact_key, find_duplicates, shingles
from trainer.data.report import QualityReport

CLEANED_NAME = "cleaned.jsonl"
REMOVED_NAME = "removed.jsonl"


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


def curate(
    docs: Iterable[tuple[int, str]],
    recipe: CleanRecipe,
    sources: Sequence[str],
    workdir: str,
    progress: Callable[[int], None] = lambda n: None,
) -> Curated:
    """Clean and dedup `docs` ((source index, text) in input order) into files under `workdir`."""
    report = QualityReport(recipe=recipe.to_dict(), sources=list(sources))
    dd = recipe.dedup
    hasher = MinHasher(dd.bands, dd.rows, dd.shingle_words, dd.seed) if dd.near else None
    contents: list[int] = []
    exacts: list[int] = []
    bands: list[np.ndarray] = []
    chars: list[int] = []
    srcs: list[int] = []
    path = os.path.join(workdir, CLEANED_NAME)
    removed_path = os.path.join(workdir, REMOVED_NAME)
    with open(path, "w", encoding="utf-8") as out, open(removed_path, "w", encoding="utf-8") as removed:
        for source, text in docs:
            report.input_documents += 1
            report.input_characters += len(text)
            progress(1)
            kept = _apply_filters(text, recipe, report, removed)
            if kept is None:
                continue
            contents.append(content_key(kept))
            if dd.exact:
                exacts.append(exact_key(kept))
            if hasher is not None:
                bands.append(hasher.band_keys(kept))
            chars.append(len(kept))
            srcs.append(source)
            out.write(json.dumps([source, kept], ensure_ascii=False) + "\n")

    n = len(contents)
    result = find_duplicates(
        np.array(contents, dtype=np.uint64),
        np.array(exacts, dtype=np.uint64) if dd.exact else None,
        np.array(bands, dtype=np.uint64).reshape(n, dd.bands) if hasher is not None else None,
        (lambda ids: _shingles_of(path, ids, dd.shingle_words)) if dd.confirm else None,
        dd.jaccard,
    )
    _record_dedup(result, chars, report)
    keep = result.keep
    report.kept_characters = [c for c, k in zip(chars, keep, strict=True) if k]
    report.kept_sources = [s for s, k in zip(srcs, keep, strict=True) if k]
    return Curated(path=path, removed_path=removed_path, keep=keep, dedup_reason=result.reason, report=report)


def _apply_filters(text: str, recipe: CleanRecipe, report: QualityReport, removed) -> str | None:
    """The text after the recipe's filters, or None; what each filter took goes to the report."""
    for f in recipe.filters:
        kept, rule = f(text)
        if kept is None:
            stage = report.stage(f.name)
            stage.documents += 1
            stage.characters += len(text)
            stage.rules[rule] = stage.rules.get(rule, 0) + 1
            removed.write(json.dumps([f.name, text, ""], ensure_ascii=False) + "\n")
            return None
        if kept != text:  # lines dropped (C4)
            stage = report.stage(f.name)
            stage.characters += len(text) - len(kept)
            rule = f"{f.name}_lines"
            stage.rules[rule] = stage.rules.get(rule, 0) + 1
            removed.write(json.dumps([f.name, text, kept], ensure_ascii=False) + "\n")
        text = kept
    return text


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
