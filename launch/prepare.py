"""`pretrain prepare INPUT... --out DIR`: raw text -> tokenizer -> token shards + manifest.json.

Parses the arguments and calls `trainer.data.prepare.prepare`, which prints progress and the
summary to stderr; stdout gets only the manifest's path, so scripts can capture it.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `pretrain prepare` arguments to `parser`."""
    parser.add_argument(
        "inputs",
        nargs="+",
        help="text sources: files, directories (recursive: .txt .md .py .rst .jsonl .jsonl.gz "
        ".jsonl.zst .parquet), globs, or http(s) URLs; read in the given order, files sorted",
    )
    parser.add_argument(
        "--out", required=True, help="output directory for shards, tokenizer.json, manifest.json"
    )
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        default=None,
        help="reuse this tokenizer.json (must contain <|endoftext|>) instead of training a byte-level BPE",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="vocabulary size of the trained tokenizer (default 8192)"
    )
    parser.add_argument(
        "--block-len",
        type=int,
        default=2049,
        help="tokens per sample; use the model's seq_len + 1 so inputs and shifted targets fit (default 2049)",
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=256, help="blocks per tar shard (default 256)"
    )
    parser.add_argument(
        "--val-blocks",
        type=int,
        default=None,
        help="blocks at the end of the stream held out as the val split (default: max(1, 0.5%% of blocks))",
    )
    parser.add_argument(
        "--text-field", default="text", help="JSON Lines / Parquet field holding the text (default 'text')"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all CPU cores)"
    )
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    parser.add_argument(
        "--tokenizer-sample-docs",
        type=int,
        default=None,
        help="train the tokenizer on only the first N documents (default: all)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards (*.tar), manifest.json and tokenizer.json in a non-empty --out",
    )


def run(args: argparse.Namespace) -> int:
    """Run `pretrain prepare` from parsed arguments."""
    from trainer.data.manifest import MANIFEST_NAME
    from trainer.data.prepare import prepare

    prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        block_len=args.block_len,
        samples_per_shard=args.samples_per_shard,
        val_blocks=args.val_blocks,
        text_field=args.text_field,
        workers=args.workers,
        max_docs=args.max_docs,
        tokenizer_sample_docs=args.tokenizer_sample_docs,
        overwrite=args.overwrite,
    )
    print(os.path.join(args.out, MANIFEST_NAME))
    return 0
