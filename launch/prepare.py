"""`pretrain prepare INPUT... --out DIR`: raw text -> tokenizer -> token shards + manifest.json.

Parses the arguments and calls `trainer.data.prepare.prepare`, which prints progress and the
summary to stderr; stdout gets only the manifest's path, so scripts can capture it.
"""

from __future__ import annotations

import argparse
import os

from launch.args import add_options, option_values

# prepare()'s keyword options: keyword -> the settings of its `--keyword` flag.
OPTIONS = {
    "tokenizer": dict(
        metavar="PATH",
        default=None,
        help="reuse this tokenizer.json (must contain <|endoftext|>) instead of training a byte-level BPE",
    ),
    "vocab_size": dict(
        type=int, default=8192, help="vocabulary size of the trained tokenizer (default 8192)"
    ),
    "block_len": dict(
        type=int,
        default=2049,
        help="tokens per sample; use the model's seq_len + 1 so inputs and shifted targets fit (default 2049)",
    ),
    "samples_per_shard": dict(type=int, default=256, help="blocks per tar shard (default 256)"),
    "val_blocks": dict(
        type=int,
        default=None,
        help="blocks at the end of the stream held out as the val split (default: max(1, 0.5%% of blocks))",
    ),
    "text_field": dict(default="text", help="JSON Lines / Parquet field holding the text (default 'text')"),
    "workers": dict(type=int, default=None, help="cleaning and tokenizer processes (default: all CPU cores)"),
    "max_docs": dict(type=int, default=None, help="stop after this many documents"),
    "tokenizer_sample_docs": dict(
        type=int, default=None, help="train the tokenizer on only the first N documents (default: all)"
    ),
    "filters": dict(
        metavar="NAMES",
        default=None,
        help="cleaning filters to run, in order, comma-separated: gopher_quality, gopher_repetition, c4, "
        "fineweb, min_length, language (default thresholds: docs/data.md#cleaning-and-deduplication; default: none)",
    ),
    "dedup": dict(
        metavar="KINDS",
        default=None,
        help="remove duplicates: exact, near or exact,near (MinHash LSH 14x8 over 5-word shingles)",
    ),
    "recipe": dict(
        metavar="YAML",
        default=None,
        help="a cleaning recipe: filters with their thresholds and dedup settings (docs/data.md#cleaning-and-deduplication)",
    ),
    "overwrite": dict(
        action="store_true",
        help="replace the shards (*.tar), manifest.json and tokenizer.json in a non-empty --out",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `pretrain prepare` arguments to `parser`."""
    parser.add_argument(
        "inputs",
        nargs="+",
        help="text sources: files, directories (recursive: .txt .md .py .rst .jsonl .jsonl.gz "
        ".jsonl.zst .parquet), globs, or http(s) URLs; read sorted by path, however listed",
    )
    parser.add_argument(
        "--out", required=True, help="output directory for shards, tokenizer.json, manifest.json"
    )
    add_options(parser, OPTIONS)
    parser.add_argument(
        "--address",
        default=None,
        help="run the clean, tokenize and shard units as tasks on the Ray cluster at this GCS address (HEAD:6379, "
        "or auto); inside a Ray job its cluster is used. The output's parent directory must be shared by "
        "every node. Same output as on this machine (docs/data.md#preparing-on-a-cluster)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `pretrain prepare` from parsed arguments."""
    from trainer.data.manifest import MANIFEST_NAME
    from trainer.data.prepare import prepare

    runner = None
    address = args.address or os.environ.get("RAY_ADDRESS", "")
    if address and not address.startswith(("http://", "https://")):  # not a job-API address
        from cluster.prepare import ray_runner

        runner = ray_runner(address)
    prepare(args.inputs, args.out, **option_values(args, OPTIONS), runner=runner)
    print(os.path.join(args.out, MANIFEST_NAME))
    return 0
