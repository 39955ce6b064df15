"""Throughput of `pretrain prepare`'s cleaning and near-duplicate stages, MinHash against libraries,
and of its tokenize + shard stages against the `tokenizers` library's own `encode_batch`.

    python benchmarks/prepare.py [--mb 8] [--tokenize-mb 40] [--rounds 3] [--json out.json]

Prints MB of text per CPU-second on one core of each cleaning filter (default thresholds) on
sentence-like documents that pass them all (so every rule is evaluated), and, on the same synthetic documents (English-like words, 200-2,000 per document), MB of text
per CPU-second on one core for each MinHash implementation that is importable, each computing
112 (14 bands x 8 rows) MinHash values over the 5-word shingles of every document:

  * rensa (chosen): the stage of trainer/data/dedup.py (normalize, shingle, RMinHash, band keys);
  * datasketch (`pip install datasketch`): MinHash(num_perm=112).update_batch on the same shingles;
  * numpy (ours): 64-bit word hashes combined into shingle hashes, 112 seeded (a x + b) mod 2^61-1.

CPU time (time.process_time), not wall time, so that other work on a shared machine does not
count. rensa and datasketch read the same shingles (normalized words, joined by spaces).

Tokenization (wall time, all cores, the same documents in 16 JSON Lines files, the same reused
byte-level BPE tokenizer of 8,192 ids): tokens/s of `encode_batch` on the documents already in
memory; of `prepare()` (reading, tokenizing, shards and manifest) on this machine; of the same on a
1-node Ray cluster started here (`--address`'s runner; its start-up not counted); of Ray Data
reading the same files and tokenizing them (`read_json` + `map_batches`, counting tokens, writing
nothing: the alternative to Ray tasks); and of `prepare --dedup exact,near` locally and on Ray
(clean units: exact and MinHash keys; the decision; the tokenize units; the report's token
counts). Rounds are interleaved after a warm-up round (Ray Data's come after all the others: its
actors linger and slowed the next Ray prepare by ~1 s); the median is printed, with the load
average before and after. Where Ray's extra time goes: the median wall and CPU seconds of each stage (clean,
tokenize, removed-token and shard units; whole runs) locally and on Ray, and Ray's one-off costs,
not counted above: `ray.init` and the first task's worker start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from trainer.data.dedup import MinHasher, hash64, normalize, shingles  # noqa: E402

NUM_PERM = 112  # 14 bands x 8 rows
SHINGLE = 5


def make_documents(megabytes: float, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(50_000)]
    docs, size = [], 0
    while size < megabytes * 1e6:
        words = rng.choices(vocab, k=rng.randint(200, 2000))
        text = " ".join(words) + "."
        docs.append(text)
        size += len(text.encode())
    return docs


def chosen(docs: list[str]) -> None:
    """The stage itself: normalize, shingle, rensa MinHash, band keys."""
    hasher = MinHasher(bands=14, rows=8, shingle_words=SHINGLE)
    for d in docs:
        hasher.band_keys(d)


def datasketch_minhash(docs: list[str]) -> None:
    from datasketch import MinHash

    for d in docs:
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode() for s in shingles(d, SHINGLE)])
        m.digest()


_MASK61 = np.uint64((1 << 61) - 1)


def numpy_minhash(docs: list[str]) -> None:
    """Ours in numpy: 64-bit word hashes (blake2b), shingle hashes combined in uint64, then
    min over (a x + b) mod 2^61-1 for 112 seeded (a, b)."""
    rng = np.random.default_rng(0)
    a = rng.integers(1, (1 << 61) - 1, NUM_PERM, dtype=np.uint64)
    b = rng.integers(0, (1 << 61) - 1, NUM_PERM, dtype=np.uint64)
    for d in docs:
        words = normalize(d).split()
        ids = {w: hash64(w.encode()) for w in set(words)}
        w = np.fromiter((ids[x] for x in words), dtype=np.uint64, count=len(words))
        k = min(SHINGLE, len(w))
        h = np.zeros(len(w) - k + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                h = h * np.uint64(0x100000001B3) + w[j : len(w) - k + 1 + j]
            x = (np.unique(h) & _MASK61)[:, None]
            (((x * a[None, :]) + b[None, :]) & _MASK61).min(axis=0)


IMPLEMENTATIONS = {
    "rensa (chosen)": (chosen, "rensa"),
    "datasketch": (datasketch_minhash, "datasketch"),
    "numpy (ours)": (numpy_minhash, None),
}


def clean_rates(megabytes: float) -> dict[str, float]:
    """MB per CPU-second of each rule filter and of all of them in a row."""
    from tests.test_clean import Writer
    from trainer.data.clean import clean_document, make_recipe

    w = Writer(0)
    docs, size = [], 0
    while size < megabytes * 1e6:
        docs.append(w.doc(lines=20))
        size += len(docs[-1].encode())
    recipe = make_recipe(filters="min_length,gopher_quality,gopher_repetition,c4,fineweb")
    rates = {}
    for f in recipe.filters:
        t0 = time.process_time()
        for d in docs:
            f(d)
        rates[f.name] = size / 1e6 / (time.process_time() - t0)
    t0 = time.process_time()
    for d in docs:
        clean_document(d, recipe.filters)
    rates["all five"] = size / 1e6 / (time.process_time() - t0)
    return rates


TOKENIZE_FILES = 16


def tokenize_rates(megabytes: float, rounds: int, worker_niceness: int | None = None) -> dict[str, Any]:
    """Median tokens/s of encode_batch, prepare locally, prepare on a 1-node Ray, the old stage."""
    import shutil
    import statistics
    import tempfile

    import ray
    import ray.data
    from tokenizers import Tokenizer

    from cluster.prepare import ray_runner
    from trainer.data import prepare as prep
    from trainer.data.pipeline import local_runner

    cores = os.cpu_count() or 1
    root = tempfile.mkdtemp(prefix="prepare-bench-")
    try:
        docs = make_documents(megabytes, seed=1)
        files = []
        for i in range(TOKENIZE_FILES):
            files.append(os.path.join(root, f"part-{i:02d}.jsonl"))
            with open(files[-1], "w") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs[i::TOKENIZE_FILES])
        tok = prep._train_tokenizer(iter(docs[:2000]), 8192, prep._Progress())
        tok_path = os.path.join(root, "tokenizer.json")
        tok.save(tok_path)
        # Ray's workers import this checkout's modules, as this process does.
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        if worker_niceness is not None:
            # Ray's config from the environment of the process that starts the node (default 15).
            os.environ["RAY_worker_niceness"] = str(worker_niceness)
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        startup = {"ray.init": time.perf_counter() - t0}
        t0 = time.perf_counter()
        ray.get(ray.remote(num_cpus=1)(_worker_imports).remote())
        startup["first task (worker start, imports)"] = time.perf_counter() - t0
        niceness = ray.get(ray.remote(num_cpus=1)(_niceness).remote())
        stages: dict[str, dict[str, list[float]]] = {"local": {}, "Ray": {}}

        def timed(runner, where: str):
            """The runner, adding each stage's wall time to stages[where], and its CPU time (of this
            process, plus that of the Ray workers' tasks) under "<stage> CPU"."""

            def run(fn, arglist, **kw):
                name, cpu = fn.__name__, 0.0
                task = _with_cpu_time(fn) if where == "Ray" else fn
                t, c = time.perf_counter(), _cpu_s()
                for record in runner(task, arglist, **kw):
                    cpu += record.pop("task_cpu_s", 0.0)
                    yield record
                stages[where].setdefault(name + case[0], []).append(time.perf_counter() - t)
                stages[where].setdefault(f"{name}{case[0]} CPU", []).append(_cpu_s() - c + cpu)

            return run

        local = timed(local_runner(cores), "local")
        runner = timed(ray_runner("local"), "Ray")
        n = [0]
        case = [""]  # " + dedup" while prepare runs with dedup: its stages are counted apart

        def encode_batch() -> int:
            t = Tokenizer.from_file(tok_path)
            return sum(len(e.ids) for e in t.encode_batch_fast(docs, add_special_tokens=False))

        def run_prepare(r, where: str, **kw) -> int:
            n[0] += 1
            out = os.path.join(root, f"out-{n[0]}")
            case[0] = " + dedup" if kw else ""
            t = time.perf_counter()
            m = prep.prepare(files, out, tokenizer=tok_path, block_len=2049, workers=cores, runner=r, **kw)
            stages[where].setdefault("whole prepare" + case[0], []).append(time.perf_counter() - t)
            shutil.rmtree(out)
            return m.source["tokens"]

        class Encode:  # Ray Data's callable class: one tokenizer per actor
            def __init__(self) -> None:
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
                self.tok = Tokenizer.from_file(tok_path)

            def __call__(self, batch: dict) -> dict:
                enc = self.tok.encode_batch_fast(list(batch["text"]), add_special_tokens=False)
                return {"n": np.array([len(e.ids) + 1 for e in enc])}  # + EOS, as prepare counts

        def ray_data() -> int:
            ray.data.DataContext.get_current().enable_progress_bars = False
            # Half a CPU each, so that the read tasks find CPUs beside one actor per core.
            ds = ray.data.read_json(files).map_batches(
                Encode, batch_size=512, compute=ray.data.ActorPoolStrategy(size=cores), num_cpus=0.5
            )
            return int(ds.sum("n"))

        cases = {
            "encode_batch": encode_batch,
            "prepare, local": lambda: run_prepare(local, "local"),
            "prepare, Ray 1 node": lambda: run_prepare(runner, "Ray"),
            "prepare + dedup, local": lambda: run_prepare(local, "local", dedup="exact,near"),
            "prepare + dedup, Ray 1 node": lambda: run_prepare(runner, "Ray", dedup="exact,near"),
        }
        rates: dict[str, list[float]] = {name: [] for name in [*cases, "Ray Data, tokenize only"]}
        load, tokens = [os.getloadavg()[0]], [0]

        def measure(name: str, fn, r: int) -> None:
            t0 = time.perf_counter()
            tokens[0] = fn()
            if r:  # round 0 warms up (Ray workers, page cache)
                rates[name].append(tokens[0] / (time.perf_counter() - t0))

        for r in range(rounds + 1):
            for name, fn in cases.items():
                measure(name, fn, r)
        # Ray Data after all the other rounds: its actors and its stats actor stay on the cluster
        # for a while after it returns and took CPU from the Ray prepare of the next round.
        for r in range(rounds + 1):
            measure("Ray Data, tokenize only", ray_data, r)
        load.append(os.getloadavg()[0])
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    median = {name: statistics.median(v) for name, v in rates.items()}
    # Stage seconds without the warm-up round.
    stage_s = {where: {k: statistics.median(v[1:]) for k, v in d.items()} for where, d in stages.items()}
    return {
        "tokens": tokens[0],
        "cores": cores,
        "load_average": load,
        "tokens_per_s": median,
        "runs": rates,
        "stage_s": stage_s,
        "ray_startup_s": startup,
        "ray_worker_niceness": niceness,
    }


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far, all threads, and of its children that
    ended (the local runner's spawned processes, once its pool has shut down)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _with_cpu_time(fn):
    """`fn`, its record carrying the CPU seconds of the process that ran it (a Ray worker runs one
    task at a time) as "task_cpu_s"."""

    def unit(*args, **kw):
        c = _cpu_s()
        record = dict(fn(*args, **kw))
        record["task_cpu_s"] = _cpu_s() - c
        return record

    unit.__name__ = fn.__name__
    return unit


def _niceness() -> int:
    return os.nice(0)


def _worker_imports() -> None:
    """What a Ray worker imports to run prepare's units."""
    import trainer.data.curate  # noqa: F401
    import trainer.data.pipeline  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=8.0, help="MB of text (default 8)")
    p.add_argument("--tokenize-mb", type=float, default=40.0, help="MB of text to tokenize (default 40)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved tokenization rounds (default 3)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument(
        "--ray-worker-niceness",
        type=int,
        default=None,
        help="niceness of the 1-node Ray cluster's workers (Ray's default: 15, which loses CPU to any "
        "other work on a shared machine)",
    )
    args = p.parse_args()
    print(f"cleaning, {args.mb:.0f} MB of documents that pass every rule, one core:")
    cleaning = clean_rates(args.mb)
    for name, rate in cleaning.items():
        print(f"  {name:<18} {rate:8.2f} MB/s per core")
    docs = make_documents(args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"{len(docs):,} documents, {mb:.1f} MB, {NUM_PERM} permutations, {SHINGLE}-word shingles, one core")
    results = {}
    for name, (fn, module) in IMPLEMENTATIONS.items():
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                print(f"  {name:<14} not installed (pip install {module})")
                continue
        t0 = time.process_time()
        fn(docs)
        cpu = time.process_time() - t0
        results[name] = mb / cpu
        print(f"  {name:<14} {mb / cpu:8.2f} MB/s per core  ({cpu:.1f} CPU-s)")
    base = results.get("rensa (chosen)")
    for name, rate in results.items():
        if base and name != "rensa (chosen)":
            print(f"  rensa (chosen) / {name} = {base / rate:.2f}x")
    tok = tokenize_rates(args.tokenize_mb, args.rounds, args.ray_worker_niceness)
    print(
        f"tokenize, {args.tokenize_mb:g} MB in {TOKENIZE_FILES} files = {tok['tokens']:,} tokens, {tok['cores']} cores, "
        f"median of {args.rounds} interleaved rounds, load average {tok['load_average'][0]:.1f} -> "
        f"{tok['load_average'][1]:.1f}, Ray worker niceness {tok['ray_worker_niceness']}:"
    )
    base = tok["tokens_per_s"]["encode_batch"]
    for name, rate in tok["tokens_per_s"].items():
        print(f"  {name:<28} {rate:12,.0f} tokens/s  {rate / base:5.2f}x encode_batch")
    for what in ("prepare", "prepare + dedup"):
        ray_vs_local = tok["tokens_per_s"][f"{what}, local"] / tok["tokens_per_s"][f"{what}, Ray 1 node"]
        print(f"  {what}: Ray 1 node takes {ray_vs_local:.2f}x the time of local")
    print("  where the time goes (median s per stage):")
    local_s, ray_s = tok["stage_s"]["local"], tok["stage_s"]["Ray"]
    for stage in [k for k in local_s if k in ray_s]:
        print(
            f"    {stage:<28} local {local_s[stage]:7.2f}  Ray {ray_s[stage]:7.2f}  Ray - local {ray_s[stage] - local_s[stage]:+6.2f}"
        )
    for what, s in tok["ray_startup_s"].items():
        print(f"  Ray start-up, not counted above: {what} {s:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "documents": len(docs),
                    "mb": mb,
                    "mb_per_cpu_s": results,
                    "cleaning": cleaning,
                    "tokenize": tok,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
