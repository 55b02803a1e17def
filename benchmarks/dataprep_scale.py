"""Dataprep at scale: `python -m dataprep` on corpora of two sizes side by side, against one-thread SentencePiece.

    python -m benchmarks.dataprep_scale [--sizes-mb 100 1000] [--files 4] [--unit-mb 8] [--vocab-size 8000] [--workdir DIR]

Each size is a seeded synthetic corpus of --files equal .jsonl.zst files (1 GB: 4 of 250 MB; documents of 200 to
3,000 Zipf-distributed made-up words, with punctuation and newlines), made once and kept in the workdir. One
tokenizer, trained once on ~20 MB of the smallest corpus, is given to every run (`--tokenizer`), so training is in no
timing. One local Ray serves every run, its start-up reported apart; each run's driver is a subprocess of its own
(joining by RAY_ADDRESS) so its peak RSS and CPU time are its own. Pipeline rate = tokens / (first worker ready ->
last shard written). The reference is `encode_exact` on one thread over ~30 MB of the same text in memory.
Units are dataprep's own (`pack.unit_mb` of on-disk bytes; a .zst file is never cut): the default --unit-mb 8 makes
each file a unit, so both sizes have 4 equal units for the 2 workers (with the default 256 MB units, the 100 MB
corpus, 51 MB of .zst, would be one unit on one core). The table says how many units there were.
Targets: per-core rate >= 85 % of the one-thread rate; driver CPU <= 5 % of all the run's CPU; driver and largest
actor peak RSS at the largest size <= 1.3x the smallest size's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray

from dataprep.__main__ import parse_args
from dataprep.pipeline import run
from dataprep.sample import sample_lines
from dataprep.sources import Part, read_documents
from dataprep.worker import ENCODE_CHARS
from raylm.tokenizer import load_tokenizer, train_tokenizer

MB = 2**20
SEED, GENERATOR = 0, 1
"""Seed of the vocabulary and the document stream; GENERATOR changes with the corpus recipe (part of the cache key)."""
VOCAB_WORDS, ZIPF_S, DOC_WORDS, DOCS_PER_CHUNK = 30_000, 1.0, (200, 3000), 1000
LINE_START = b'{"text": "'
SEPARATORS = {b" ": 0.82, b", ": 0.07, b". ": 0.07, b".\\n": 0.03, b".\\n\\n": 0.01}
"""What follows a word, JSON-escaped; a document's last word is followed by DOC_END."""
DOC_END = b'."}\n' + LINE_START
TOKENIZER_MB, BASELINE_MB = 20, 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = "import sys; from benchmarks.dataprep_scale import drive; drive(sys.argv[1:])"
RSS_RATIO, DRIVER_SHARE, EFFICIENCY = 1.3, 0.05, 0.85


@dataclasses.dataclass
class Pieces:
    """What a corpus is drawn from, shaped so a chunk of it is a few whole-array numpy operations."""

    table: np.ndarray
    """(pieces, 16) bytes, zero-padded: the words, then the separators, then the document end."""
    words: np.ndarray
    """Inverse CDF of the words' Zipf frequencies: a uniform draw of an entry draws a word id."""
    separators: np.ndarray


def inverse_cdf(weights: np.ndarray, bins: int = 1 << 20) -> np.ndarray:
    """Entry -> index, so that a uniform entry is an index drawn with these weights (to 1/bins), without a search."""
    cdf = np.cumsum(weights) / np.sum(weights)
    return np.searchsorted(cdf, (np.arange(bins) + 0.5) / bins).astype(np.int32)


def make_pieces() -> Pieces:
    """~30k made-up lowercase words, longer as they get rarer (~2 letters at the top, ~9 in the tail, as in real
    text), with Zipf rank frequencies."""
    rng = np.random.default_rng(SEED)
    rank = np.arange(1, VOCAB_WORDS + 1)
    lengths = np.clip(np.round(2 + 0.65 * np.log(rank) + rng.normal(0, 1.2, VOCAB_WORDS)), 1, 14).astype(int)
    letters = rng.integers(ord("a"), ord("z") + 1, (VOCAB_WORDS, 16), dtype=np.uint8)
    pieces = [letters[i, :n].tobytes() for i, n in enumerate(lengths)] + list(SEPARATORS) + [DOC_END]
    table = np.array([np.frombuffer(p.ljust(16, b"\0"), np.uint8) for p in pieces])
    return Pieces(table, inverse_cdf(1 / rank**ZIPF_S), VOCAB_WORDS + inverse_cdf(np.array(list(SEPARATORS.values()))))


def jsonl_chunk(rng: np.random.Generator, p: Pieces) -> bytes:
    """DOCS_PER_CHUNK JSON lines of log-uniform length (~6 MB), made without a Python loop over words."""
    words = np.exp(rng.uniform(*np.log(DOC_WORDS), DOCS_PER_CHUNK)).astype(np.int64)
    n = int(words.sum())
    ids = np.empty(2 * n, np.int32)
    ids[0::2] = p.words[rng.integers(0, len(p.words), n)]
    ids[1::2] = p.separators[rng.integers(0, len(p.separators), n)]
    ids[2 * np.cumsum(words) - 1] = len(p.table) - 1  # a document's last word ends its line and starts the next
    rows = np.take(p.table, ids, axis=0)
    return LINE_START + rows[rows != 0].tobytes()[:-len(LINE_START)]


def write_corpus(path: str, size_mb: float, files: int) -> None:
    """`size_mb` of JSON lines in `files` equal .jsonl.zst files, made beside `path` and renamed into
    place when whole, so a killed run never leaves a partial corpus to be reused."""
    per_file = int(size_mb * MB / files)
    rng, pieces, rest = np.random.default_rng(SEED), make_pieces(), b""
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for i in range(files):
        with pa.CompressedOutputStream(os.path.join(partial, f"part-{i:04d}.jsonl.zst"), "zstd") as out:
            room = per_file
            while True:  # the lines of a chunk that do not fit start the next file
                data = rest or jsonl_chunk(rng, pieces)
                cut = len(data) if len(data) <= room else data.rfind(b"\n", 0, room) + 1
                out.write(data[:cut])
                room, rest = room - cut, data[cut:]
                if rest:
                    break
    os.rename(partial, path)


def corpus(workdir: str, size_mb: float, files: int) -> str:
    path = os.path.join(workdir, f"corpus-{size_mb:g}mb-{files}files-seed{SEED}-v{GENERATOR}")
    if not os.path.isdir(path):
        t0 = time.perf_counter()
        write_corpus(path, size_mb, files)
        print(f"made {path} in {time.perf_counter() - t0:.0f}s", flush=True)
    return path


def parts(corpus_dir: str) -> list[Part]:
    return [Part(f, os.path.getsize(f), os.path.basename(f)) for f in sorted(glob.glob(f"{corpus_dir}/*.jsonl.zst"))]


def tokenizer(workdir: str, corpus_dir: str, vocab_size: int) -> str:
    """A tokenizer trained once on ~TOKENIZER_MB of the corpus (kept in the workdir for reruns)."""
    path = os.path.join(workdir, f"tokenizer-{vocab_size}-{os.path.basename(corpus_dir)}.model")
    if not os.path.exists(path):
        lines = sample_lines(parts(corpus_dir), text_field="text", budget=TOKENIZER_MB * MB, per_file=TOKENIZER_MB * MB)
        model = train_tokenizer(lines, vocab_size=vocab_size, num_threads=os.cpu_count() or 1)
        with open(path + ".partial", "wb") as f:
            f.write(model)
        os.rename(path + ".partial", path)
    return path


def documents(corpus_dir: str) -> Iterator[str]:
    for part in parts(corpus_dir):
        yield from (doc.text for doc in read_documents(part, text_field="text", encoding_errors="strict"))


def one_thread_rate(model_path: str, corpus_dir: str) -> tuple[float, float]:
    """(tokens/s, MB encoded) of `encode_exact` on one thread over ~BASELINE_MB of documents already in memory, in
    batches of ENCODE_CHARS as the workers encode; one EOS per document counted, as dataprep does."""
    batches, chars = [[]], 0
    for text in documents(corpus_dir):
        batches[-1].append(text)
        chars += len(text)
        if chars >= len(batches) * ENCODE_CHARS:
            batches.append([])
        if chars >= BASELINE_MB * MB:
            break
    with open(model_path, "rb") as f:
        tokenizer = load_tokenizer(f.read())
    t0 = time.perf_counter()
    tokens = sum(len(ids) + 1 for texts in batches for ids in tokenizer.encode(texts, num_threads=1))
    return tokens / (time.perf_counter() - t0), chars / MB


def drive(argv: list[str]) -> None:
    """One dataprep run in this process (a benchmark subprocess; RAY_ADDRESS joins the benchmark's Ray): its figures
    as the last line of stdout."""
    cfg, _ = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # dataprep's summary and workers' lines; stdout is for the figures
        result = run(cfg)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "tokens": result.manifest["tokens"], "units": result.manifest["units"],
        "zst_bytes": result.manifest["input_bytes"], "workers_start": result.timings.workers_start,
        "units_s": result.timings.units, "units_cpu_s": sum(u["cpu_s"] for u in result.units),
        "actor_rss_mb": max(u["peak_rss_mb"] for u in result.units), "driver_cpu_s": result.driver_cpu_s,
        "process_cpu_s": usage.ru_utime + usage.ru_stime, "driver_rss_mb": usage.ru_maxrss / 1024,
        "received": result.driver_received_bytes,
    }), flush=True)


def run_dataprep(corpus_dir: str, output: str, model_path: str, gcs_address: str, unit_mb: float) -> dict:
    argv = ["--input", corpus_dir, "--output", output, "--tokenizer", model_path, "--seq-len", "2048", "--overwrite",
            f"--pack.unit_mb={unit_mb}"]
    env = {**os.environ, "RAY_ADDRESS": gcs_address, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, *argv], check=True, stdout=subprocess.PIPE, text=True,
                          env=env, cwd=REPO)
    return json.loads(proc.stdout.splitlines()[-1])


def start_ray() -> tuple[str, int, float]:
    """(GCS address, CPUs, start-up seconds) of a local Ray of the benchmark's own (never one already running here);
    without token auth, as the local Ray a raylm command starts, so the drivers join it as they are."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    return ray.get_runtime_context().gcs_address, int(ray.cluster_resources()["CPU"]), time.perf_counter() - t0


ROWS = {
    "input text MB": lambda r: f"{r['size_mb']:g}",
    "input .zst MB": lambda r: f"{r['zst_bytes'] / MB:.1f}",
    "tokens": lambda r: f"{r['tokens']:,}",
    "units": lambda r: f"{r['units']}",
    "pipeline tokens/s": lambda r: f"{r['rate']:,.0f}",
    "tokens/s per core": lambda r: f"{r['rate'] / r['cpus']:,.0f}",
    "per-core efficiency": lambda r: f"{100 * r['efficiency']:.1f}%",
    "worker start-up s": lambda r: f"{r['workers_start']:.1f}",
    "units s (read..write)": lambda r: f"{r['units_s']:.1f}",
    "units CPU-s (sum)": lambda r: f"{r['units_cpu_s']:.1f}",
    "driver peak RSS MB": lambda r: f"{r['driver_rss_mb']:.0f}",
    "driver CPU-s (run)": lambda r: f"{r['driver_cpu_s']:.1f}",
    "driver CPU-s (process)": lambda r: f"{r['process_cpu_s']:.1f}",
    "driver received kB": lambda r: f"{r['received'] / 1e3:.1f}",
    "largest actor RSS MB": lambda r: f"{r['actor_rss_mb']:.0f}",
    "driver CPU share": lambda r: f"{100 * r['share']:.2f}%",
}
"""The table's rows; "driver CPU-s (run)" is dataprep's own figure (from `run` on), the share's numerator."""


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(runs: list[dict]) -> None:
    """The side-by-side table (runs from the smallest size up), then each target met or missed."""
    print(f"\n{'':24s}" + "".join(f"{format(r['size_mb'], 'g') + ' MB':>16s}" for r in runs))
    for name, cell in ROWS.items():
        print(f"{name:24s}" + "".join(f"{cell(r):>16s}" for r in runs))
    for name, key, ok, goal in (("per-core efficiency", "efficiency", lambda v: v >= EFFICIENCY, ">= 85 %"),
                                ("driver CPU share", "share", lambda v: v <= DRIVER_SHARE, "<= 5 %")):
        cells = ", ".join(f"{r['size_mb']:g} MB {100 * r[key]:.1f}% {verdict(ok(r[key]))}" for r in runs)
        print(f"{name} (target {goal}): {cells}")
    small, large = runs[0], runs[-1]
    for name, key in (("driver peak RSS", "driver_rss_mb"), ("largest actor RSS", "actor_rss_mb")):
        ratio = large[key] / small[key]
        print(f"{name}, {large['size_mb']:g} MB / {small['size_mb']:g} MB: {ratio:.2f}x (target <= {RSS_RATIO}x) "
              f"{verdict(ratio <= RSS_RATIO)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 1000])
    ap.add_argument("--files", type=int, default=4, help="files per corpus")
    ap.add_argument("--unit-mb", type=float, default=8, help="dataprep's --pack.unit_mb (of on-disk, compressed bytes)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raylm-bench-dataprep"))
    args = ap.parse_args()
    sizes, workdir = sorted(set(args.sizes_mb)), os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    corpora = [corpus(workdir, s, args.files) for s in sizes]
    model_path = tokenizer(workdir, corpora[0], args.vocab_size)
    one_thread, baseline_mb = one_thread_rate(model_path, corpora[-1])
    print(f"SentencePiece encode_exact, 1 thread, {baseline_mb:.0f} MB in memory: {one_thread:,.0f} tokens/s "
          f"(vocab {args.vocab_size})", flush=True)
    gcs_address, cpus, ray_start = start_ray()
    print(f"local Ray, {cpus} CPUs: started in {ray_start:.1f}s (in no figure below)", flush=True)
    runs = []
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as out:
            for size, corpus_dir in zip(sizes, corpora):
                r = run_dataprep(corpus_dir, os.path.join(out, f"{size:g}mb"), model_path, gcs_address, args.unit_mb)
                rate = r["tokens"] / r["units_s"]
                runs.append({**r, "size_mb": size, "cpus": cpus, "rate": rate, "efficiency": rate / cpus / one_thread,
                             "share": r["driver_cpu_s"] / (r["driver_cpu_s"] + r["units_cpu_s"])})
    finally:
        ray.shutdown()
    report(runs)


if __name__ == "__main__":
    main()
