"""Exact and near-duplicate removal for `pretrain prepare`.

Per document (pure functions, any worker): `content_key` (64-bit hash of the text, which picks the
document a cluster keeps), `exact_key` (64-bit hash of the normalized text) and `band_keys` (one
64-bit key per LSH band of a MinHash signature over word shingles). Then one deterministic step,
`find_duplicates`, groups the documents (same exact key, or same key in any band, optionally
confirmed by the true Jaccard similarity of their shingle sets) and keeps in each cluster the
document with the smallest content key, so which one survives depends neither on the input order
nor on how the work was split.

The MinHash values come from rensa (a Rust extension), the fastest on the same documents of those
benchmarks/prepare.py compares (datasketch, a numpy version of ours; figures in docs/benchmarks.md);
its values depend only on (seed, shingles), in every process.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_NON_WORD = re.compile(r"[^\w\s]+")


def hash64(data: bytes) -> int:
    """A 64-bit hash that is the same in every process (Python's `hash` of str is salted)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def normalize(text: str) -> str:
    """Text as dedup compares it: NFKC, lower case, punctuation removed, whitespace collapsed."""
    text = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower())
    return " ".join(text.split())


def content_key(text: str) -> int:
    """64-bit hash of the exact text: the smallest in a cluster is the document kept."""
    return hash64(text.encode("utf-8"))


def exact_key(text: str) -> int:
    """64-bit hash of the normalized text: equal keys are exact duplicates."""
    return hash64(normalize(text).encode("utf-8"))


def shingles(text: str, n: int = 5) -> list[str]:
    """The normalized text's n-word shingles, words joined by one space (the whole normalized
    text when it has fewer than n words)."""
    words = normalize(text).split()
    if len(words) <= n:
        return [" ".join(words)]
    # zip stops at the shortest tail: the last shingle starts n words before the end.
    return [" ".join(gram) for gram in zip(*(words[i:] for i in range(n)), strict=False)]


@dataclass(frozen=True)
class MinHasher:
    """`bands x rows` MinHash values per document (rensa's RMinHash, seeded), cut into LSH bands."""

    bands: int = 14
    rows: int = 8
    shingle_words: int = 5
    seed: int = 0

    def signature(self, text: str) -> np.ndarray:
        """(bands * rows,) uint32 MinHash values of the document's shingles."""
        from rensa import RMinHash

        m = RMinHash(num_perm=self.bands * self.rows, seed=self.seed)
        m.update(shingles(text, self.shingle_words))
        return np.asarray(m.digest(), dtype=np.uint32)

    def band_keys(self, text: str) -> np.ndarray:
        """(bands,) uint64: a hash of each band's rows of the document's signature."""
        sig = self.signature(text).reshape(self.bands, self.rows)
        return np.array([hash64(bytes([b]) + row.tobytes()) for b, row in enumerate(sig)], dtype=np.uint64)


def jaccard(a: set[str], b: set[str]) -> float:
    """True Jaccard similarity of two shingle sets."""
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class DedupResult:
    """Which documents survive and why the others do not."""

    keep: np.ndarray
    """(n,) bool."""
    reason: dict[int, str]
    """Removed document -> "exact_dedup" or "near_dedup"."""
    cluster_sizes: dict[str, dict[int, int]]
    """"exact" / "near" -> {cluster size: number of clusters} (clusters of 2 or more)."""


def _runs(keys: np.ndarray) -> Iterable[np.ndarray]:
    """Indices grouped by equal key, for keys held by 2 or more documents (in key order)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    for s, e in zip(starts, ends, strict=True):
        if e - s > 1:
            yield np.sort(order[s:e])


def find_duplicates(
    content: np.ndarray,
    exact: np.ndarray | None,
    bands: np.ndarray | None,
    shingles_of: Callable[[Sequence[int]], dict[int, set[str]]] | None = None,
    jaccard_threshold: float = 0.7,
) -> DedupResult:
    """Cluster documents and keep the smallest `content` key of each cluster.

    content: (n,) uint64 content keys; exact: (n,) uint64 exact keys or None (no exact dedup);
    bands: (n, bands) uint64 LSH band keys or None (no near dedup); shingles_of: for the given
    document indices, their shingle sets (None: candidates are not confirmed).
    """
    n = len(content)
    uf = _UnionFind(n)
    exact_groups = list(_runs(exact)) if exact is not None else []
    for group in exact_groups:
        for i in group[1:]:
            uf.union(int(group[0]), int(i))
    exact_root = np.array([uf.find(i) for i in range(n)])

    if bands is not None and len(bands):
        buckets = [g for b in range(bands.shape[1]) for g in _runs(bands[:, b])]
        cache: dict[int, set[str]] = {}
        if shingles_of is not None:
            cache = shingles_of(sorted({int(i) for g in buckets for i in g}))
        for group in buckets:
            # Members in content-key order, so clusters do not depend on the input order.
            ordered = sorted((int(i) for i in group), key=lambda i: (int(content[i]), i))
            if shingles_of is None:
                for i in ordered[1:]:
                    uf.union(ordered[0], i)
                continue
            # One representative per cluster met in this bucket: a bucket of k copies of one text
            # costs k comparisons, not k^2.
            reps: list[int] = []
            for i in ordered:
                joined = False
                for r in reps:
                    if uf.find(r) == uf.find(i) or jaccard(cache[r], cache[i]) >= jaccard_threshold:
                        uf.union(r, i)
                        joined = True
                if not joined:
                    reps.append(i)

    roots = np.array([uf.find(i) for i in range(n)])
    keep = np.zeros(n, dtype=bool)
    reason: dict[int, str] = {}
    members: dict[int, list[int]] = {}
    for i, r in enumerate(roots):
        members.setdefault(int(r), []).append(i)
    near_sizes: dict[int, int] = {}
    for group in members.values():
        # Smallest content key; equal keys are equal texts, so the lowest index is as good as any.
        kept = min(group, key=lambda i: (int(content[i]), i))
        keep[kept] = True
        for i in group:
            if i != kept:
                # Exact when an exact twin of i is kept or i had an exact twin before near merging.
                reason[i] = "exact_dedup" if exact_root[i] == exact_root[kept] else "near_dedup"
        if len({int(exact_root[i]) for i in group}) > 1:
            near_sizes[len(group)] = near_sizes.get(len(group), 0) + 1
    exact_sizes: dict[int, int] = {}
    for group in exact_groups:
        exact_sizes[len(group)] = exact_sizes.get(len(group), 0) + 1
    return DedupResult(
        keep=keep,
        reason=reason,
        cluster_sizes={"exact": dict(sorted(exact_sizes.items())), "near": dict(sorted(near_sizes.items()))},
    )
