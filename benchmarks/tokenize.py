"""Tokenization throughput: raylm's Ray Data pipeline vs plain SentencePiece, side by side in one run.

    python -m benchmarks.tokenize [--vocab-size 32000] [--max-files N]

On the demo corpus (this Python's standard library), with one tokenizer trained first, it measures:
  1. `sp.encode(batch)` in this process on one thread, then on all threads (no I/O: texts already in memory);
  2. the full dataprep pipeline (read files, tokenize in the Ray Data actor pool, pack, write shards) on a local
     Ray using every core, excluding Ray start-up, which is reported on its own.
Target: pipeline ≥ 0.8 × cores × the one-thread rate (per-core efficiency ≥ 80 %).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path and its name shadows the stdlib's `tokenize`.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from raylm import storage
from dataprep.pipeline import DEMO_EXCLUDE, DataprepConfig, demo_inputs, list_corpus, run
from dataprep.tokenizer import load_tokenizer, train_tokenizer


def corpus_texts(max_files: int | None) -> tuple[list, list[str]]:
    files = list_corpus(demo_inputs(), max_files=max_files, exclude=DEMO_EXCLUDE)
    texts = [storage.read_bytes(f.path).decode("utf-8", errors="replace") for f in files]
    return files, [t for t in texts if t]  # the pipeline skips empty documents


def encode_rate(sp, texts: list[str], threads: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    ids = sp.encode(texts, out_type=int, num_threads=threads)
    seconds = time.perf_counter() - t0
    tokens = sum(map(len, ids)) + len(ids)  # + one EOS per document, as the pipeline counts them
    return tokens / seconds, tokens


def pipeline(model_path: str, cores: int, max_files: int | None) -> dict:
    """Rates of the real dataprep run: end to end, and once its actors are up; and Ray's start-up times."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    import ray.data  # noqa: F401 - part of start-up, not of the pipeline
    init = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        cfg = DataprepConfig(inputs=demo_inputs(), output=out, tokenizer=model_path, encoding_errors="replace",
                             max_files=max_files, seq_len=2048)
        t0 = time.perf_counter()
        result = run(cfg, exclude=DEMO_EXCLUDE)
        total = time.perf_counter() - t0
    ray.shutdown()
    tokens = result.manifest["tokens"]
    return {"tokens": tokens, "end_to_end": tokens / total, "steady": tokens / result.seconds, "init": init,
            "actors": result.startup_seconds, "other": total - result.seconds - result.startup_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--max-files", type=int)
    args = ap.parse_args()
    cores = os.cpu_count() or 1

    files, texts = corpus_texts(args.max_files)
    print(f"corpus: {len(files)} files, {sum(f.size for f in files) / 1e6:.1f} MB; {cores} cores")
    lines = [l for t in texts for l in t.split("\n") if l and len(l.encode()) <= 16384]
    model = train_tokenizer(lines, vocab_size=args.vocab_size, num_threads=cores)
    sp = load_tokenizer(model)
    one, tokens = encode_rate(sp, texts, threads=1)
    every, _ = encode_rate(sp, texts, threads=cores)
    with tempfile.NamedTemporaryFile(suffix=".model") as f:
        f.write(model)
        f.flush()
        ray_run = pipeline(f.name, cores, args.max_files)
    assert ray_run["tokens"] == tokens, (ray_run["tokens"], tokens)
    ray_rate = ray_run["steady"]

    print(f"\n{tokens:,} tokens, vocab {args.vocab_size}")
    print(f"plain sp.encode, 1 thread        : {one / 1e6:6.2f} M tokens/s")
    print(f"plain sp.encode, {cores} threads       : {every / 1e6:6.2f} M tokens/s  ({every / one:.2f}x one thread)")
    print(f"raylm Ray Data pipeline, {cores} cores : {ray_rate / 1e6:6.2f} M tokens/s  ({ray_rate / one:.2f}x one thread, "
          f"{ray_rate / every:.2f}x all threads): read+tokenize+pack+write, actors up")
    print(f"per-core efficiency               : {ray_rate / (cores * one):.0%}  (target >= 80%)")
    print(f"Ray start-up (not included above) : ray.init + import {ray_run['init']:.1f} s, tokenizer actor pool "
          f"{ray_run['actors']:.1f} s, listing/settings/manifest {ray_run['other']:.1f} s")
    print(f"end to end incl. actor start-up   : {ray_run['end_to_end'] / 1e6:6.2f} M tokens/s  "
          f"({ray_run['end_to_end'] / (cores * one):.0%} per-core efficiency)")


if __name__ == "__main__":
    main()
