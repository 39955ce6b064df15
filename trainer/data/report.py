"""The quality report of `pretrain prepare`: what each cleaning and dedup stage removed
(documents, characters, tokens), duplicate cluster sizes, and per source histograms of document
length and tokens. Written as `report.json` and `report.png` next to the manifest."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
# Histogram bins: [0, 1), [1, 2), [2, 4), ... [2^39, 2^40): document lengths in chars or tokens.
_EDGES = np.r_[0, 2.0 ** np.arange(0, 41)].astype(np.int64)


def histogram(values: np.ndarray) -> dict[str, list[int]]:
    """Counts over power-of-two bins, trailing empty bins dropped."""
    counts, _ = np.histogram(np.asarray(values, dtype=np.int64), bins=_EDGES)
    last = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 0
    return {"edges": _EDGES[: last + 1].tolist(), "counts": counts[:last].tolist()}


@dataclass
class Removed:
    """What one stage removed: whole documents, and characters/tokens (lines dropped count too)."""

    documents: int = 0
    characters: int = 0
    tokens: int = 0
    rules: dict[str, int] = field(default_factory=dict)
    """Rule -> documents it removed (dropped lines are counted under "<stage>_lines")."""


@dataclass
class QualityReport:
    """Everything `report.json` holds, filled in by the cleaning pass and the tokenization pass."""

    recipe: dict[str, Any]
    sources: list[str]
    removed: dict[str, Removed] = field(default_factory=dict)
    cluster_sizes: dict[str, dict[int, int]] = field(default_factory=dict)
    input_documents: int = 0
    input_characters: int = 0
    kept_characters: list[int] = field(default_factory=list)
    """Characters of each kept document, in output order."""
    kept_sources: list[int] = field(default_factory=list)
    """Source index of each kept document, in output order."""
    kept_tokens: np.ndarray | None = None
    """Tokens of each kept document (EOS not counted), in output order; set after tokenizing."""

    def stage(self, name: str) -> Removed:
        return self.removed.setdefault(name, Removed())

    def to_dict(self) -> dict[str, Any]:
        kept_chars = np.asarray(self.kept_characters, dtype=np.int64)
        kept_src = np.asarray(self.kept_sources, dtype=np.int64)
        tokens = self.kept_tokens if self.kept_tokens is not None else np.zeros(0, dtype=np.int64)
        per_source = []
        for i, src in enumerate(self.sources):
            mine = kept_src == i
            per_source.append(
                {
                    "source": src,
                    "documents_kept": int(mine.sum()),
                    "characters_kept": int(kept_chars[mine].sum()),
                    "tokens_kept": int(tokens[mine].sum()) if tokens.size == mine.size else None,
                    "characters_per_document": histogram(kept_chars[mine]),
                    "tokens_per_document": histogram(tokens[mine]) if tokens.size == mine.size else None,
                }
            )
        return {
            "recipe": self.recipe,
            "input": {"documents": self.input_documents, "characters": self.input_characters},
            "kept": {
                "documents": len(self.kept_characters),
                "characters": int(kept_chars.sum()),
                "tokens": int(tokens.sum()),
            },
            "removed": {
                name: {
                    "documents": r.documents,
                    "characters": r.characters,
                    "tokens": r.tokens,
                    "rules": r.rules,
                }
                for name, r in self.removed.items()
            },
            "duplicate_clusters": {
                kind: {str(size): n for size, n in sizes.items()}
                for kind, sizes in self.cluster_sizes.items()
            },
            "sources": per_source,
        }

    def summary_lines(self) -> list[str]:
        """Prepare's last lines about cleaning: documents in/out and what each stage removed."""
        kept = len(self.kept_characters)
        lines = [
            f"[prepare] cleaning: {self.input_documents:,} documents in, {kept:,} kept "
            f"({self.input_characters - sum(self.kept_characters):,} characters removed)"
        ]
        for name, r in self.removed.items():
            lines.append(
                f"[prepare]   {name}: {r.documents:,} documents, {r.characters:,} characters, {r.tokens:,} tokens removed"
            )
        for kind, sizes in self.cluster_sizes.items():
            if sizes:
                clusters = sum(sizes.values())
                lines.append(f"[prepare]   {kind} duplicate clusters: {clusters:,} (largest {max(sizes)})")
        return lines

    def write(self, directory: str) -> list[str]:
        """report.json and report.png in `directory`; returns their file names."""
        data = self.to_dict()
        with open(os.path.join(directory, REPORT_JSON), "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        _plot(data, os.path.join(directory, REPORT_PNG))
        return [REPORT_JSON, REPORT_PNG]


def _plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(data["removed"]) or ["(nothing removed)"]
    docs = [data["removed"].get(n, {}).get("documents", 0) for n in names]
    axes[0].barh(names, docs)
    axes[0].set_title(
        f"documents removed ({data['input']['documents']:,} in, {data['kept']['documents']:,} kept)"
    )
    axes[0].invert_yaxis()
    for ax, key, label in (
        (axes[1], "characters_per_document", "characters per kept document"),
        (axes[2], "tokens_per_document", "tokens per kept document"),
    ):
        for src in data["sources"]:
            hist = src[key]
            if hist and hist["counts"]:
                ax.stairs(
                    hist["counts"], np.maximum(hist["edges"], 0.5), label=os.path.basename(src["source"])
                )
        ax.set_xscale("log")
        ax.set_title(label)
        ax.set_ylabel("documents")
        if len(data["sources"]) <= 10:
            ax.legend(fontsize="small")
    fig.tight_layout()
    # Fixed metadata: the same report gives the same bytes.
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
