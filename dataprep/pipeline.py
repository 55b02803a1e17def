"""The dataprep run: list the corpus, get a tokenizer, tokenize in a Ray Data actor pool, pack, write, commit.

Determinism: files are processed in sorted path order (`preserve_order`), a document's split is a hash of its
stable key and the seed, the tokenizer sample is chosen by hash too, and nothing written depends on timing. The
manifest is written last: a directory without one is not a dataset.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import posixpath
import sysconfig
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raylm import storage
from dataprep.dataset import FORMAT, FORMAT_VERSION, MANIFEST, read_manifest
from raylm.errors import ConfigError, DataError, StorageError
from dataprep.shards import SplitPacker, rows_per_batch
from dataprep.sources import BadRecord, Document, file_format, read_documents
from raylm.storage import FileEntry
from dataprep.tokenizer import encode_exact, load_tokenizer, sha256, token_dtype, train_tokenizer
from raylm.ray_session import init_ray, quiet_ray_data

log = logging.getLogger(__name__)

MAX_GROUP_BYTES = 4 << 20
"""Input bytes per Ray Data block at most: big enough to amortise per-task overhead, small enough to balance."""
CHUNK_CHARS = 2 << 20
"""Text per encode call inside an actor; bounds actor memory for huge files."""
MAX_SAMPLE_LINE_BYTES = 16384
TOKENIZER = "tokenizer.model"


@dataclass(kw_only=True)
class DataprepConfig:
    inputs: list[str]
    output: str
    tokenizer: str | None = None
    vocab_size: int = 32000
    tokenizer_sample_mb: float = 64.0
    seq_len: int = 2048
    val_fraction: float = 0.005
    text_field: str = "text"
    shard_size_mb: float = 128.0
    num_workers: int | None = None
    seed: int = 0
    on_bad_record: str = "error"
    encoding_errors: str = "strict"
    max_files: int | None = None
    overwrite: bool = False

    def __post_init__(self):
        checks = [
            (self.vocab_size >= 300, "--vocab-size", self.vocab_size, "must be >= 300 (bytes + specials)"),
            (self.vocab_size <= 1 << 32, "--vocab-size", self.vocab_size, "must fit in uint32"),
            (self.seq_len >= 1, "--seq-len", self.seq_len, "must be >= 1"),
            (0 <= self.val_fraction < 1, "--val-fraction", self.val_fraction, "must be in [0, 1)"),
            (self.shard_size_mb > 0, "--shard-size", self.shard_size_mb, "must be > 0"),
            (self.tokenizer_sample_mb > 0, "--tokenizer-sample-mb", self.tokenizer_sample_mb, "must be > 0"),
            (self.num_workers is None or self.num_workers >= 1, "--num-workers", self.num_workers, "must be >= 1"),
            (self.max_files is None or self.max_files >= 1, "--max-files", self.max_files, "must be >= 1"),
        ]
        for ok, flag, value, rule in checks:
            if not ok:
                raise ConfigError(f"{flag} {value}: {rule}")

    def settings(self) -> dict:
        """What determines the output bytes; a finished dataset with other settings is not reused."""
        keep = ("vocab_size", "tokenizer_sample_mb", "seq_len", "val_fraction", "text_field", "shard_size_mb",
                "seed", "on_bad_record", "encoding_errors", "max_files")
        return {k: v for k, v in asdict(self).items() if k in keep}


DEMO_EXCLUDE = "site-packages/"


def demo_inputs() -> list[str]:
    """The running interpreter's standard library: a corpus every machine has (~1,800 .py files, ~32 MB)."""
    return [os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")]


def list_corpus(inputs: list[str], *, max_files: int | None = None, exclude: str | None = None) -> list[FileEntry]:
    """Every readable file of the inputs in path order, deduplicated.

    A file named on the command line is always read (as text unless its suffix says otherwise); files found under
    a directory, prefix or glob only if their type is known, so images or archives beside the text are skipped.
    """
    found = {
        e.path: e
        for path in inputs
        for e in storage.list_files(path)
        if (e.named or file_format(e.path) is not None) and not (exclude and exclude in e.key)
    }
    files = [found[p] for p in sorted(found)]
    if not files:
        raise DataError(f"no readable files in {' '.join(inputs)} (raylm reads text/source, .jsonl and .parquet files)")
    return files[:max_files] if max_files else files


def _unit_hash(*parts: object) -> float:
    """A stable hash of `parts` in [0, 1): the same on every machine, process and Python version."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def group_files(files: list[FileEntry], workers: int) -> list[dict]:
    """Consecutive files packed into Ray Data items, in path order: ~16 per worker, so that when the last items
    run, the idle share of the pool is small."""
    target_bytes = min(MAX_GROUP_BYTES, sum(f.size for f in files) // (16 * workers) + 1)
    groups, current, size = [], [], 0
    for f in files:
        current.append(f)
        size += f.size
        if size >= target_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return [{"files": json.dumps([asdict(f) for f in g])} for g in groups]


def _entries(batch: pa.Table) -> Iterator[FileEntry]:
    for group in batch.column("files").to_pylist():
        yield from (FileEntry(**f) for f in json.loads(group))


@dataclass(frozen=True)
class ReadOptions:
    text_field: str
    encoding_errors: str


# ----------------------------------------------------------------------------------------- tokenizer training
def _sample_lines(batch: pa.Table, *, read: ReadOptions, max_chars: int) -> pa.Table:
    """Lines of the documents in `batch` (at most `max_chars` per file), for the tokenizer trainer."""
    lines = []
    for entry in _entries(batch):
        chars = 0
        for record in read_documents(entry, entry.key, **asdict(read)):
            if isinstance(record, Document) and chars < max_chars:
                chars += len(record.text)
                lines.extend(l for l in record.text.split("\n") if l and len(l.encode()) <= MAX_SAMPLE_LINE_BYTES)
    return pa.table({"line": pa.array(lines, pa.large_string())})


def tokenizer_sample(files: list[FileEntry], cfg: DataprepConfig) -> list[str]:
    """A bounded random sample of corpus lines, read through Ray Data; the same files + seed give the same lines.

    Files are chosen by a seeded hash until their size covers the budget, so a huge corpus is not read in full.
    """
    import ray

    budget = int(cfg.tokenizer_sample_mb * 2**20)
    chosen, size = [], 0
    for f in sorted(files, key=lambda f: _unit_hash(cfg.seed, "tokenizer-sample", f.key)):
        if size >= budget:
            break
        chosen.append(f)
        size += f.size
    read = ReadOptions(cfg.text_field, "replace")
    groups = group_files(chosen, workers=int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(groups, override_num_blocks=len(groups))
    ds = ds.map_batches(_sample_lines, fn_kwargs={"read": read, "max_chars": budget}, batch_size=1,
                        batch_format="pyarrow", num_cpus=0.5)
    lines, chars = [], 0
    with closing(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))) as batches:
        for batch in batches:
            for line in batch.column("line").to_pylist():
                if chars >= budget:
                    return lines
                lines.append(line)
                chars += len(line)
    return lines


def read_given_tokenizer(path: str) -> bytes:
    """The bytes of a user's SentencePiece model, checked to load."""
    try:
        model = storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"--tokenizer {path} does not exist; pass a SentencePiece .model file") from None
    except OSError as exc:
        raise StorageError(storage.describe_os_error(exc, path)) from None
    load_tokenizer(model, where=path)
    return model


def train_on_sample(files: list[FileEntry], cfg: DataprepConfig) -> bytes:
    t0 = time.perf_counter()
    lines = tokenizer_sample(files, cfg)
    if not lines:
        raise DataError("the corpus has no text to train a tokenizer on; check --input and --text-field")
    model = train_tokenizer(lines, vocab_size=cfg.vocab_size, num_threads=os.cpu_count() or 1)
    log.info("trained a %d-token BPE tokenizer on %d lines in %.1fs", cfg.vocab_size, len(lines), time.perf_counter() - t0)
    return model


# ------------------------------------------------------------------------------------- tokenize in an actor pool
class TokenizeFiles:
    """Ray Data actor: reads its files, tokenizes documents (model loaded once per actor), appends EOS, and emits
    per-split token streams. Bad records travel as data so the driver reports them in corpus order."""

    def __init__(self, tokenizer_path: str, read: ReadOptions, seed: int, val_fraction: float):
        self.sp = load_tokenizer(storage.read_bytes(tokenizer_path), where=tokenizer_path)
        self.dtype = token_dtype(self.sp.vocab_size())
        self.read, self.seed, self.val_fraction = read, seed, val_fraction
        self.ready_at = time.time()

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        docs, bad, chars = [], [], 0
        for entry in _entries(batch):
            for record in read_documents(entry, entry.key, **asdict(self.read)):
                if isinstance(record, BadRecord):
                    bad.append(f"{record.where}: {record.reason}")
                    continue
                docs.append(record)
                chars += len(record.text)
                if chars >= CHUNK_CHARS:
                    yield self._encode(docs, bad)
                    docs, bad, chars = [], [], 0
        yield self._encode(docs, bad)

    def _is_val(self, doc: Document) -> bool:
        return self.val_fraction > 0 and _unit_hash(self.seed, "split", doc.key) < self.val_fraction

    def _stream(self, ids: list[list[int]]) -> pa.Array:
        eos = self.sp.eos_id()
        for doc in ids:
            doc.append(eos)
        total = sum(map(len, ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=total)
        return pa.array([flat], pa.large_list(pa.from_numpy_dtype(self.dtype)))

    def _encode(self, docs: list[Document], bad: list[str]) -> pa.Table:
        ids = encode_exact(self.sp, [d.text for d in docs], num_threads=1)  # one core per actor: no oversubscription
        val = [self._is_val(d) for d in docs]
        return pa.table({
            "train": self._stream([t for t, v in zip(ids, val) if not v]),
            "val": self._stream([t for t, v in zip(ids, val) if v]),
            "train_docs": [len(val) - sum(val)],
            "val_docs": [sum(val)],
            "replaced": [sum(d.replaced_utf8 for d in docs)],
            "bad": pa.array([bad], pa.list_(pa.string())),
            "ready_at": [self.ready_at],
        })


def tokenized_batches(files: list[FileEntry], tokenizer_path: str, cfg: DataprepConfig) -> Iterator[pa.Table]:
    """The actor pool's output tables, in corpus order."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    if cfg.num_workers:  # asked for: one CPU each, the pool growing as an autoscaling cluster adds nodes for them
        workers, actor_cpus = cfg.num_workers, 1.0
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=workers)
    else:  # one per CPU present (a fraction of one on a cluster with less than a CPU)
        workers = max(1, int(cpus))
        actor_cpus, pool = min(1.0, cpus / workers), ray.data.ActorPoolStrategy(size=workers)
    groups = group_files(files, workers)
    ds = ray.data.from_items(groups, override_num_blocks=len(groups))
    ds = ds.map_batches(
        TokenizeFiles,
        fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "read": ReadOptions(cfg.text_field, cfg.encoding_errors),
                               "seed": cfg.seed, "val_fraction": cfg.val_fraction},
        batch_size=1,
        batch_format="pyarrow",
        compute=pool,
        num_cpus=actor_cpus,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


# ------------------------------------------------------------------------------------------------- the run
@dataclass
class PackStats:
    replaced_utf8: int = 0
    bad_records: int = 0
    workers_ready_at: float = float("inf")
    """Wall-clock time the first tokenizer actor was ready: separates Ray start-up from throughput."""
    finished_at: float = 0.0


def pack(batches: Iterator[pa.Table], packers: dict[str, SplitPacker], cfg: DataprepConfig) -> PackStats:
    """Feed the token streams to the packers; stop at the first bad record unless told to skip."""
    counts = PackStats()
    for table in batches:
        for i in range(table.num_rows):
            bad = table.column("bad")[i].as_py()
            if bad and cfg.on_bad_record == "error":
                raise DataError(bad[0])
            counts.bad_records += len(bad)
            counts.replaced_utf8 += table.column("replaced")[i].as_py()
            counts.workers_ready_at = min(counts.workers_ready_at, table.column("ready_at")[i].as_py())
            for split, packer in packers.items():
                tokens = table.column(split)[i].values.to_numpy(zero_copy_only=False)
                packer.add(tokens, table.column(f"{split}_docs")[i].as_py())
    counts.finished_at = time.time()
    return counts


DATASET_ENTRIES = {"train", "val", TOKENIZER, MANIFEST}
"""What a dataset directory holds; dataprep writes into nothing else."""


def prepare_output(cfg: DataprepConfig, settings: dict) -> bool:
    """Make the output ready for a fresh write; False if it already holds this exact dataset (nothing to do)."""
    old = read_manifest(cfg.output)
    if old is not None and not cfg.overwrite:
        if old["settings"] == settings:
            return False
        changed = sorted(k for k in settings.keys() | old["settings"].keys() if settings.get(k) != old["settings"].get(k))
        raise ConfigError(
            f"{cfg.output} already holds a dataset made with other settings ({', '.join(changed)} differ); "
            "pass --overwrite to replace it or choose another --output"
        )
    fs, root = storage.filesystem(cfg.output)
    try:
        strangers = sorted(posixpath.basename(f.path) for f in fs.get_file_info(
            pafs.FileSelector(root, allow_not_found=True)) if posixpath.basename(f.path) not in DATASET_ENTRIES)
        if strangers:
            raise ConfigError(f"{cfg.output} is not empty and not a raylm dataset (it holds {', '.join(strangers[:3])}"
                              f"{', …' if len(strangers) > 3 else ''}); choose a new or empty --output")
        fs.create_dir(root, recursive=True)
        if old is not None:  # the manifest goes first, so an interrupted overwrite is never taken as a dataset
            fs.delete_file(storage.join(root, MANIFEST))
        for split in ("train", "val"):
            fs.create_dir(storage.join(root, split), recursive=True)
            fs.delete_dir_contents(storage.join(root, split), missing_dir_ok=True)
        storage.write_bytes(storage.join(cfg.output, ".raylm-write-check"), b"")
        fs.delete_file(storage.join(root, ".raylm-write-check"))
    except OSError as exc:
        raise StorageError(f"cannot write the output: {storage.describe_os_error(exc, cfg.output)}") from None
    return True


def build_manifest(cfg, files, model, trained, splits, counts: PackStats, settings) -> dict:
    sp = load_tokenizer(model)
    dtype = token_dtype(sp.vocab_size())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "row_len": cfg.seq_len + 1,
        "dtype": dtype.name,
        "rows_per_batch": rows_per_batch(cfg.seq_len + 1, dtype),
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "tokenizer": {"file": TOKENIZER, "sha256": sha256(model), "vocab_size": sp.vocab_size(),
                      "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "trained": trained},
        "splits": splits,
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "bad_records": counts.bad_records,
        "replaced_utf8_documents": counts.replaced_utf8,
        "sources": [{"path": f.path, "size": f.size} for f in files],
        "settings": settings,
    }


def cfg_settings(cfg: DataprepConfig, files: list[FileEntry], given_tokenizer: bytes | None) -> dict:
    """The settings stamp of a run: options, the tokenizer given (by content) and the exact source files."""
    given = {"tokenizer_sha256": sha256(given_tokenizer)} if given_tokenizer else {}
    sources = hashlib.sha256(json.dumps([[f.path, f.size] for f in files]).encode()).hexdigest()
    return {**cfg.settings(), **given, "sources_sha256": sources}


@dataclass
class RunResult:
    manifest: dict
    startup_seconds: float = 0.0
    """From submitting the tokenize pipeline until its first actor was ready (Ray Data start-up)."""
    seconds: float = 0.0
    """From then until the last shard was written."""


def run(cfg: DataprepConfig, *, exclude: str | None = None) -> RunResult:
    """Make the dataset. Safe to re-run: a finished identical dataset is left as it is."""
    import ray

    files = list_corpus(cfg.inputs, max_files=cfg.max_files, exclude=exclude)
    log.info("corpus: %d files, %.1f MB", len(files), sum(f.size for f in files) / 1e6)
    given_tokenizer = read_given_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    settings = cfg_settings(cfg, files, given_tokenizer)
    existed = storage.exists(cfg.output)
    if not prepare_output(cfg, settings):
        print(f"dataprep: {cfg.output} already holds this dataset (same inputs and settings); nothing to do")
        return RunResult(read_manifest(cfg.output))
    init_ray()
    quiet_ray_data()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    try:
        return make_dataset(cfg, files, given_tokenizer, settings)
    except BaseException:
        remove_partial_output(cfg.output, existed=existed)
        raise


def remove_partial_output(output: str, *, existed: bool) -> None:
    """A failed run leaves the output as it found it: absent, or without the tokenizer and shards begun here."""
    if not existed:
        storage.delete_dir(output)
        return
    for name in ("train", "val"):
        storage.delete_dir(storage.join(output, name))
    storage.delete_file(storage.join(output, TOKENIZER))


def make_dataset(cfg: DataprepConfig, files: list[FileEntry], given_tokenizer: bytes | None, settings: dict):
    model = given_tokenizer or train_on_sample(files, cfg)
    tokenizer_path = storage.join(cfg.output, TOKENIZER)
    storage.write_bytes(tokenizer_path, model)
    dtype = token_dtype(load_tokenizer(model).vocab_size())
    rows_per_shard = max(1, int(cfg.shard_size_mb * 2**20) // ((cfg.seq_len + 1) * dtype.itemsize))
    packers = {s: SplitPacker(cfg.output, s, cfg.seq_len + 1, rows_per_shard, dtype) for s in ("train", "val")}
    started_at = time.time()
    with closing(tokenized_batches(files, tokenizer_path, cfg)) as batches:
        counts = pack(batches, packers, cfg)
    splits = {s: p.finish() for s, p in packers.items()}
    check_not_empty(splits, cfg)
    manifest = build_manifest(cfg, files, model, given_tokenizer is None, splits, counts, settings)
    storage.write_bytes(storage.join(cfg.output, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    result = RunResult(manifest, counts.workers_ready_at - started_at, counts.finished_at - counts.workers_ready_at)
    print_summary(result, len(files), cfg.output)
    return result


def check_not_empty(splits: dict, cfg: DataprepConfig) -> None:
    docs = sum(s["documents"] for s in splits.values())
    if docs == 0:
        raise DataError(f"the corpus in {' '.join(cfg.inputs)} has no documents (all files empty or skipped)")
    if splits["train"]["rows"] == 0:
        raise DataError(
            f"the corpus has {splits['train']['tokens']} training tokens, less than one row of "
            f"--seq-len {cfg.seq_len} + 1; add text or lower --seq-len"
        )


def print_summary(result: RunResult, n_files: int, output: str) -> None:
    m, row_len = result.manifest, result.manifest["row_len"]
    print(f"dataprep: {n_files:,} files -> {m['documents']:,} documents, {m['tokens']:,} tokens in {result.seconds:.1f}s "
          f"({m['tokens'] / max(result.seconds, 1e-9) / 1e6:.2f}M tokens/s read+tokenize+pack+write, "
          f"after {result.startup_seconds:.1f}s of tokenizer-actor start-up)")
    for name, s in m["splits"].items():
        size = sum(sh["bytes"] for sh in s["shards"]) / 1e6
        print(f"  {name:5s}: {s['documents']:,} docs, {s['rows']:,} rows x {row_len} tokens in {len(s['shards'])} "
              f"shards ({size:.1f} MB), {s['dropped_tokens']:,} tail tokens dropped")
    print(f"  tokenizer: vocab {m['tokenizer']['vocab_size']:,} ({'trained' if m['tokenizer']['trained'] else 'given'}), "
          f"{m['dtype']}; bad records skipped: {m['bad_records']}, "
          f"documents with invalid UTF-8 replaced: {m['replaced_utf8_documents']}")
    if m["splits"]["val"]["rows"] == 0:
        print("  warning: val/ has no full row; raise --val-fraction or lower --seq-len for a validation split")
    print(f"  dataset: {output}")
