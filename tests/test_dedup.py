"""Exact and near-duplicate removal of `pretrain prepare` on a synthetic corpus with planted
duplicate clusters whose true Jaccard similarities (5-word shingles) are measured here, in plain
Python, independently of trainer/data/dedup.py."""

from __future__ import annotations

import json
import random
import re
import string

import pytest

from trainer.data.clean import make_recipe
from trainer.data.curate import curate
from trainer.data.dedup import content_key
from trainer.data.prepare import prepare

N_WORDS = 200


def _vocab(rng: random.Random, n: int = 20_000) -> list[str]:
    return sorted({"".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(n)})


def _shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.sub(r"[^\w\s]+", " ", text.lower()).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def true_jaccard(a: str, b: str) -> float:
    x, y = _shingle_set(a), _shingle_set(b)
    return len(x & y) / len(x | y)


def _variant(rng: random.Random, words: list[str], vocab: list[str], target: float) -> list[str]:
    """`words` with a block of fresh words replaced so the shingle Jaccard is about `target`:
    an interior block of m words changes m + 4 of the S shingles, J = (S - m - 4) / (S + m + 4)."""
    s = len(words) - 4
    m = max(1, int(s * (1 - target) / (1 + target)) - 4)  # rounded down: J >= target
    start = rng.randint(5, len(words) - m - 5)
    return words[:start] + rng.sample(vocab, m) + words[start + m :]


def planted_corpus(seed: int = 0) -> tuple[list[str], dict]:
    """Documents and what was planted: exact clusters (index lists), near pairs (index, index, J)."""
    rng = random.Random(seed)
    vocab = _vocab(rng)
    docs: list[str] = []
    truth: dict = {"exact": [], "near": []}

    def new_doc() -> list[str]:
        return rng.sample(vocab, N_WORDS)

    for _ in range(60):  # singletons
        docs.append(" ".join(new_doc()) + ".")
    for k in range(30):  # exact clusters of 2-4: same words, case / spacing / punctuation differ
        words = new_doc()
        members = []
        for c in range(2 + k % 3):
            text = " ".join(words) if c == 0 else ("  ".join(words).upper() if c == 1 else ", ".join(words))
            members.append(len(docs))
            docs.append(text + ".")
        truth["exact"].append(members)
    # Near pairs at planted similarities: >= 0.8 must be found, < 0.6 must be kept.
    for target in (0.8, 0.85, 0.9, 0.95, 0.5, 0.55):
        for _ in range(25):
            base = new_doc()
            var = _variant(rng, base, vocab, target)
            a, b = len(docs), len(docs) + 1
            docs += [" ".join(base) + ".", " ".join(var) + "."]
            truth["near"].append((a, b, true_jaccard(docs[a], docs[b])))
    return docs, truth


def _run(docs: list[str], tmp_path, dedup: str = "exact,near", order: list[int] | None = None):
    order = order if order is not None else list(range(len(docs)))
    tmp_path.mkdir(exist_ok=True)
    recipe = make_recipe(dedup=dedup)
    curated = curate(((0, docs[i]) for i in order), recipe, ["synthetic"], str(tmp_path))
    removed = {order[i]: reason for i, reason in curated.dedup_reason.items()}
    return curated, removed


def test_exact_duplicates_all_found_without_false_positives(tmp_path):
    docs, truth = planted_corpus()
    _, removed = _run(docs, tmp_path, dedup="exact")
    planted = {i for cluster in truth["exact"] for i in cluster}
    # Every cluster keeps exactly one member: the one with the smallest content hash.
    for cluster in truth["exact"]:
        kept = [i for i in cluster if i not in removed]
        assert kept == [min(cluster, key=lambda i: content_key(docs[i]))]
        assert all(removed[i] == "exact_dedup" for i in cluster if i not in kept)
    assert set(removed) <= planted  # no false positive: near pairs and singletons all kept
    assert len(removed) == sum(len(c) - 1 for c in truth["exact"])


@pytest.mark.slow
def test_near_duplicates_recall_and_precision(tmp_path):
    docs, truth = planted_corpus()
    curated, removed = _run(docs, tmp_path)
    high = [(a, b) for a, b, j in truth["near"] if j >= 0.8]
    low = [(a, b) for a, b, j in truth["near"] if j < 0.6]
    assert len(high) >= 90 and len(low) >= 45, "the planted similarities are off"
    found = sum(1 for a, b in high if (a in removed) != (b in removed))
    assert found / len(high) >= 0.95, f"near-duplicate recall {found}/{len(high)}"
    for a, b in high:
        if a in removed or b in removed:
            kept, gone = (a, b) if b in removed else (b, a)
            assert removed[gone] == "near_dedup"
            assert content_key(docs[kept]) < content_key(docs[gone])  # the smaller hash is kept
    # With true-Jaccard confirmation, no pair below 0.6 and no singleton is removed.
    planted_dups = {i for c in truth["exact"] for i in c} | {i for a, b in high for i in (a, b)}
    false_positives = set(removed) - planted_dups
    assert not false_positives, [(i, docs[i][:40]) for i in false_positives]
    kept = len(docs) - len(removed)
    precision = 1 - len(false_positives) / max(len(removed), 1)
    assert precision >= 0.99 and kept == curated.keep.sum()
    sizes = curated.report.cluster_sizes
    assert sum(sizes["exact"].values()) == len(truth["exact"]) and sum(sizes["near"].values()) == found


@pytest.mark.slow
def test_kept_documents_do_not_depend_on_input_order(tmp_path):
    docs, _ = planted_corpus(seed=1)
    _, removed = _run(docs, tmp_path / "a")
    order = list(range(len(docs)))
    random.Random(7).shuffle(order)
    _, removed_shuffled = _run(docs, tmp_path / "b", order=order)

    # The same texts survive (of byte-identical copies, which index stays cannot matter).
    def kept(gone):
        return sorted(docs[i] for i in range(len(docs)) if i not in gone)

    assert kept(removed) == kept(removed_shuffled)
    assert sorted(removed.values()) == sorted(removed_shuffled.values())


def test_prepare_writes_dedup_report_and_only_kept_documents(tmp_path):
    rng = random.Random(3)
    vocab = _vocab(rng, 3000)
    unique = [" ".join(rng.sample(vocab, 80)) + "." for _ in range(30)]
    copies = [unique[i].upper() for i in range(5)]  # exact duplicates of the first five
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in unique + copies))
    out = tmp_path / "out"
    m = prepare(
        [str(inp)], str(out), vocab_size=300, block_len=17, samples_per_shard=64, workers=1, dedup="exact"
    )
    report = json.loads((out / "report.json").read_text())
    assert m.source["documents"] == 30 and report["kept"]["documents"] == 30
    assert report["removed"]["exact_dedup"]["documents"] == 5
    assert report["removed"]["exact_dedup"]["characters"] == sum(len(c) for c in copies)
    assert report["removed"]["exact_dedup"]["tokens"] > 0
    assert report["duplicate_clusters"]["exact"] == {"2": 5}
    assert m.source["cleaning"]["dedup"]["exact"] is True
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
