"""The dataprep run, on the driver: list the corpus, cut it into units, get a tokenizer, let Ray Data run the units
that are not done yet, and write the manifest from their stats. With `workers.local` the driver trains the tokenizer
and runs the units itself, one after another, and never imports Ray.

Determinism: units are fixed by the sorted listing and `pack.unit_mb`; a document's split is a seeded hash of its
file and position; the tokenizer sample is chosen by a seeded hash; each unit's shards depend on nothing but its
input. So the bytes are the same on any cluster, with any Ray Data settings, and after any number of resumes.

Sources: each input is one source (a domain: web, code, books…); a unit packs each source into rows and shards of
its own, and the manifest names the source of every shard, so held-out loss can be measured per source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import resource
import sysconfig
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from dataprep.config import EXAMPLE_FORMATS, DataprepConfig
from dataprep.output import (SOURCES, SPLITS, committed_units, has_committed_units, prepare_output, remove_strays,
                             remove_unfinished, run_stamp, write_manifest, write_run_record, write_sources)
from dataprep.sample import sample_and_train, sample_plan
from dataprep.sources import COMPRESSIONS, file_format
from dataprep.units import Unit, plan_units
from dataprep.worker import SOURCE_COUNTS, PackUnits, UnitJob
from raylm import storage
from raylm.dataset import FORMAT, FORMAT_VERSION, PLANES, read_manifest, rows_per_batch
from raylm.errors import ConfigError, DataError
from raylm.lease import check_held, held
from raylm.ray_session import check_local_paths, init_ray, quiet_ray_data
from raylm.storage import FileEntry
from raylm.tokenizer import (SP_FILE, Tokenizer, load_tokenizer, read_tokenizer_files, token_dtype,
                             write_tokenizer_files)

log = logging.getLogger(__name__)
DEMO_EXCLUDE = "site-packages/"
DEMO_SOURCE = "stdlib"
"""The demo corpus's one source."""
LOCAL_NODE = "local"
"""What the summary calls the node of units packed with `workers.local`."""
WILDCARD = re.compile(r"[*?\[]")
CHAT_NO_REPLY = "dropped"
"""What becomes of a conversation with no reply token within a row (ExamplePacker's `no_reply`): it is left out."""
LEASE_S = 60.0
"""One run per output: the run renews its lease on the output every LEASE_S / 4; one not renewed for LEASE_S is
presumed dead and taken over by the next run."""


def demo_inputs() -> list[str]:
    """The running interpreter's standard library: a corpus every machine has (~1,800 .py files, ~32 MB)."""
    return [os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")]


def source_names(inputs: list[str]) -> list[str]:
    """The name of each input's source, in input order: its last folder or prefix before any wildcard, or a named
    file's name without format and compression suffixes (`data/web/` → web, `s3://b/dolma/books/*.json.gz` → books,
    `corpus/wiki.jsonl.gz` → wiki). Inputs that would share a name are named by their whole path instead (trailing
    '/' stripped), so two inputs never pass for one source."""
    names = [_source_name(path) for path in inputs]
    shared = {name for name, n in Counter(names).items() if n > 1}
    names = [(path.rstrip("/") or path) if name in shared else name for path, name in zip(inputs, names)]
    twice = next((name for name, n in Counter(names).items() if n > 1), None)
    if twice:
        raise ConfigError(f"--input {twice} is given twice; give each input once (each input is one source)")
    return names


def _source_name(path: str) -> str:
    wildcard = WILDCARD.search(path)
    folder = path[:wildcard.start()].rpartition("/")[0] if wildcard else path.rstrip("/")
    name = posixpath.basename(posixpath.normpath(folder)) if folder else ""
    if name in ("", ".", ".."):
        return path.rstrip("/") or path
    return name if wildcard or path.endswith("/") else without_suffixes(name)


def without_suffixes(name: str) -> str:
    """A file name without its compression suffix, then its format suffix: `wiki.jsonl.gz` → wiki."""
    stem, ext = posixpath.splitext(name)
    if ext.lower() in COMPRESSIONS:
        name = stem
    stem = posixpath.splitext(name)[0]
    return stem if stem and file_format(name) else name


def list_corpus(inputs: list[str], *, max_files: int | None = None, exclude: str | None = None) -> list[FileEntry]:
    """Every readable file of the inputs in path order, deduplicated: a file several inputs list belongs to the
    first of them (its `source` is that input's index).

    A file named on the command line is always read (as text unless its suffix says otherwise); files found under
    a directory, prefix or glob only if their type is known, so images or archives beside the text are skipped.
    """
    found: dict[str, FileEntry] = {}
    for source, path in enumerate(inputs):
        for e in storage.list_files(path):
            if (e.named or file_format(e.path) is not None) and not (exclude and exclude in e.key):
                found.setdefault(e.path, dataclasses.replace(e, source=source))
    files = [found[p] for p in sorted(found)]
    if not files:
        raise DataError(f"no readable files in {' '.join(inputs)} (raylm reads text/source, .jsonl and .parquet files)")
    return files[:max_files] if max_files else files


def read_given_tokenizer(path: str) -> Tokenizer:
    """A user's tokenizer (SentencePiece or Hugging Face), checked to load."""
    return load_tokenizer(read_tokenizer_files(path), where=f"--tokenizer {path}")


def check_chat_inputs(cfg: DataprepConfig, files: list[FileEntry], tokenizer: Tokenizer | None) -> None:
    """Chat and preference data need the model's own tokenizer, with a chat template, and .jsonl files: refused
    before any work."""
    fmt = cfg.input.format
    if tokenizer is None:
        raise ConfigError(f"--format {fmt} needs --tokenizer: the tokenizer of the model to fine-tune (its run or "
                          "dataset directory, its tokenizer.model, or a Hugging Face model folder)")
    if tokenizer.chat_template is None:
        raise DataError(f"--tokenizer {cfg.tokenizer.file} has no chat template (a SentencePiece model without "
                        "raylm's chat markers, or a Hugging Face tokenizer without chat_template); use the model's "
                        "own chat tokenizer, or retrain the tokenizer with this raylm")
    other = next((f.path for f in files if file_format(f.path) != "jsonl"), None)
    if other:
        raise DataError(f"--format {fmt} reads .jsonl records; {other} is not a .jsonl file")
    most = np.iinfo(token_dtype(tokenizer.vocab_size)).max
    if cfg.pack.seq_len + 1 > most:  # a row's example indices are stored in the token dtype
        raise ConfigError(f"pack.seq_len={cfg.pack.seq_len} (--seq-len): {fmt} rows with this tokenizer hold at most "
                          f"{most} positions; lower it")


def run_settings(cfg: DataprepConfig, files: list[FileEntry], given_tokenizer: Tokenizer | None,
                 names: list[str]) -> dict:
    """The settings stamp of a run: options, the tokenizer given (by content) and the exact source files. With
    several sources, also their names and each file's source (shards then hold one source each, so such a dataset
    made before sources were recorded is never resumed); with one, the stamp datasets always had. `bos` only when
    documents start with BOS: a dataset made before the choice existed had none, and keeps its stamp. Chat data
    names its rule for conversations whose prompt fills a row (CHAT_NO_REPLY): a chat dataset or unfinished run made
    before that rule wrote such rows, so its units are never mixed with this run's."""
    given = {"tokenizer_sha256": given_tokenizer.sha256} if given_tokenizer else {}
    several = len(names) > 1
    listed = [[f.path, f.size, f.source] if several else [f.path, f.size] for f in files]
    sources = hashlib.sha256(json.dumps(listed).encode()).hexdigest()
    bos = {"bos": True} if starts_with_bos(cfg.pack.bos, given_tokenizer) else {}
    chat = {"no_reply": CHAT_NO_REPLY} if cfg.input.format == "chat" else {}
    return {**cfg.settings(), **given, **bos, **chat, **({"sources": names} if several else {}),
            "sources_sha256": sources}


def starts_with_bos(choice: str, given: Tokenizer | None) -> bool:
    """`--bos` resolved: auto follows the given tokenizer (a tokenizer trained here is raylm's: no BOS)."""
    if choice == "auto":
        return given is not None and given.bos_first
    if choice == "on" and given is not None and given.bos_id is None:
        raise ConfigError("pack.bos='on' (--bos): the --tokenizer given has no BOS token; use --bos auto or off")
    return choice == "on"


@dataclass
class Timings:
    """Where a run's wall time went, for the summary (and benchmarks)."""

    listing: float = 0.0
    """Listing the corpus, checking the output, cutting the units."""
    ray_start: float = 0.0
    tokenizer: float = 0.0
    workers_start: float = 0.0
    """From submitting the units until the first actor was ready."""
    units: float = 0.0
    """From then until the last unit's shards were written and committed."""


@dataclass
class RunResult:
    manifest: dict
    units: list[dict] = field(default_factory=list)
    """Stats of the units run now (with the node each ran on); units reused from an earlier attempt are not here."""
    reused: int = 0
    timings: Timings = field(default_factory=Timings)
    driver_cpu_s: float = 0.0
    driver_received_bytes: int = 0
    """Bytes of unit results the driver received from Ray Data."""


def run(cfg: DataprepConfig, *, demo: bool = False) -> RunResult:
    """Make the dataset, or finish one a killed run began. A finished identical dataset is left as it is."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    output = cfg.output.dir = storage.absolute(cfg.output.dir)
    where = {"--output.dir": output, "--input.paths": next((p for p in cfg.input.paths if not storage.is_s3(p)), ""),
             "--tokenizer.file": cfg.tokenizer.file or ""}
    for path in [output, *cfg.input.paths, cfg.tokenizer.file or ""]:
        storage.check_bucket(path)
    names = [DEMO_SOURCE] if demo else source_names(cfg.input.paths)
    files = list_corpus(cfg.input.paths, max_files=cfg.input.max_files, exclude=DEMO_EXCLUDE if demo else None)
    given_tokenizer = read_given_tokenizer(cfg.tokenizer.file) if cfg.tokenizer.file else None
    if cfg.input.format in EXAMPLE_FORMATS:
        check_chat_inputs(cfg, files, given_tokenizer)
    settings = run_settings(cfg, files, given_tokenizer, names)
    if not cfg.workers.local:  # one process on one machine: its paths are its own
        check_local_paths(where, shared_fs=cfg.storage.shared_fs)
    existed = storage.exists(output)
    failed = True
    try:
        with held(output, job="dataprep", seconds=LEASE_S, what="dataset output", flag="--output") as lease:
            result = _run_held(cfg, files, names, given_tokenizer, settings, lease.token, timings_from=t0)
        failed = False
    finally:
        if failed and not existed:
            storage.delete_empty_dir(output)  # nothing of the run is left in it: the output as the run found it
    if result is None:
        return RunResult(read_manifest(output))
    result.driver_cpu_s = time.process_time() - cpu0
    print_summary(result, len(files), output)
    return result


def _run_held(cfg: DataprepConfig, files: list[FileEntry], names: list[str], given_tokenizer: Tokenizer | None,
              settings: dict, lease: str, *, timings_from: float) -> RunResult | None:
    """The run while it holds the output's lease (token `lease`); None if the output already holds this dataset.
    A failed run with nothing worth resuming leaves the output as it found it, unless it lost the lease: then the
    output is another run's."""
    output = cfg.output.dir
    state = prepare_output(output, settings, overwrite=cfg.output.overwrite)
    if state == "finished":
        print(f"dataprep: {output} already holds this dataset (same inputs and settings); nothing to do")
        return None
    units = plan_units(files, max(1, int(cfg.pack.unit_mb * 2**20)))
    timings = Timings(listing=time.perf_counter() - timings_from)
    log.info("corpus: %d files, %.1f MB, %d units", len(files), sum(f.size for f in files) / 1e6, len(units))
    t = time.perf_counter()
    if not cfg.workers.local:
        init_ray()
        quiet_ray_data()
    timings.ray_start = time.perf_counter() - t
    try:
        return make_dataset(cfg, files, names, units, given_tokenizer, settings, resume=state == "resume",
                            timings=timings, lease=lease)
    except BaseException as exc:
        check_held(output, lease, what="dataset output")  # (raises LeaseLost) a run that lost it cleans nothing
        if not has_committed_units(output):  # nothing worth resuming: leave the output as the run found it
            remove_unfinished(output)
            raise
        if isinstance(exc, DataError):
            raise DataError(f"{exc} (the units finished so far are kept: running again resumes)") from None
        raise


def get_tokenizer(cfg: DataprepConfig, files: list[FileEntry], given: Tokenizer | None, settings: dict, *,
                  resume: bool) -> Tokenizer:
    """The run's tokenizer: the one a resumed run already wrote, the user's, or one trained on a sample in a Ray
    task (on a worker node of a cluster: the driver's node may have no CPUs to spare), or here (`workers.local`)."""
    if resume:
        return load_tokenizer(read_tokenizer_files(cfg.output.dir), where=cfg.output.dir)
    if given is None:
        plan = sample_plan(files, seed=cfg.pack.seed, sample_mb=cfg.tokenizer.sample_mb,
                           sample_file_mb=cfg.tokenizer.sample_file_mb)
        train = sample_and_train if cfg.workers.local else in_ray_task(sample_and_train)
        model, lines = train(plan, text_field=cfg.input.text_field, vocab_size=cfg.tokenizer.vocab_size)
        given = load_tokenizer({SP_FILE: model})
        log.info("trained a %d-token BPE tokenizer on %d lines from %d files", cfg.tokenizer.vocab_size, lines,
                 len(plan["parts"]))
    write_tokenizer_files(given.files, cfg.output.dir)
    write_run_record(cfg.output.dir, settings, given.sha256)
    return given


def in_ray_task(fn: Callable) -> Callable:
    """`fn` run as a Ray task of one CPU (retried if its node dies), returning its result."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(fn)
    return lambda *args, **kwargs: ray.get(task.remote(*args, **kwargs))


def make_dataset(cfg: DataprepConfig, files: list[FileEntry], names: list[str], units: list[Unit],
                 given_tokenizer: Tokenizer | None, settings: dict, *, resume: bool, timings: Timings,
                 lease: str = "") -> RunResult:
    t = time.perf_counter()
    tokenizer = get_tokenizer(cfg, files, given_tokenizer, settings, resume=resume)
    timings.tokenizer = time.perf_counter() - t
    done = committed_units(cfg.output.dir, units, settings, tokenizer.sha256) if resume else {}
    if done:
        log.info("resuming: %d of %d units already written", len(done), len(units))
    job = unit_job(cfg, tokenizer, run_stamp(settings, tokenizer.sha256), sources=len(names),
                   bos=settings.get("bos", False), lease=lease)
    result = RunResult({}, reused=len(done), timings=timings)
    fresh = run_units([u for u in units if u.index not in done], job, cfg, result)
    stats = [done.get(u.index) or fresh[u.index] for u in units]
    check_not_empty(stats, cfg)
    if lease:  # a driver that lost the output (presumed dead, yet running) removes and writes nothing
        check_held(cfg.output.dir, lease, what="dataset output")
    write_sources(cfg.output.dir, files)
    remove_strays(cfg.output.dir, {s["file"] for st in stats for split in SPLITS for s in st["splits"][split]["shards"]})
    result.manifest = build_manifest(cfg, tokenizer, given_tokenizer is None, stats, settings, len(files), names)
    write_manifest(cfg.output.dir, result.manifest)
    return result


def planes(cfg: DataprepConfig) -> int:
    """Token planes in a row: chat and preference rows carry the example index and loss mask beside the tokens."""
    return len(PLANES) if cfg.input.format in EXAMPLE_FORMATS else 1


def unit_job(cfg: DataprepConfig, tokenizer: Tokenizer, stamp: str, *, sources: int, bos: bool,
             lease: str = "") -> UnitJob:
    row_bytes = planes(cfg) * (cfg.pack.seq_len + 1) * token_dtype(tokenizer.vocab_size).itemsize
    return UnitJob(
        output=cfg.output.dir, tokenizer=tokenizer.files, run_stamp=stamp,
        seq_len=cfg.pack.seq_len, rows_per_shard=max(1, int(cfg.pack.shard_mb * 2**20) // row_bytes),
        val_fraction=cfg.pack.val_fraction, seed=cfg.pack.seed, text_field=cfg.input.text_field,
        encoding_errors=cfg.input.encoding_errors, on_bad_record=cfg.input.on_bad_record,
        format=cfg.input.format, overlong=cfg.pack.overlong, sources=sources, bos=bos, lease=lease,
    )


def actor_pool(cfg: DataprepConfig, units: int):
    """(pool strategy, CPUs per actor): one actor per CPU present, or `workers.num_workers` of one CPU each that
    start as an autoscaling cluster adds nodes for them; never more actors than units."""
    import ray

    one_at_a_time = {"max_tasks_in_flight_per_actor": 1}  # a unit never queues behind a long one on a busy actor
    if cfg.workers.num_workers:
        size = {"min_size": 1, "max_size": min(cfg.workers.num_workers, units)}
        return ray.data.ActorPoolStrategy(**size, **one_at_a_time), 1.0
    cpus = ray.cluster_resources().get("CPU", 1)
    workers = max(1, int(cpus))
    return ray.data.ActorPoolStrategy(size=min(workers, units), **one_at_a_time), min(1.0, cpus / workers)


def run_units(units: list[Unit], job: UnitJob, cfg: DataprepConfig, result: RunResult) -> dict[int, dict]:
    """Stats of `units`, run in a Ray Data actor pool in any order, or in this process one after another
    (`workers.local`); the first bad record stops the run."""
    if not units:
        return {}
    submitted, stats = time.time(), {}
    packed = pack_here(units, job) if cfg.workers.local else pack_in_ray_data(units, job, cfg, result)
    with closing(packed):  # a bad record stops the Ray Data iterator now, not when it is garbage
        for unit in packed:
            if "error" in unit:
                raise DataError(unit["error"])
            stats[unit["unit"]] = unit
    first_ready = min(unit["ready_at"] for unit in stats.values())
    result.timings.workers_start = first_ready - submitted
    result.timings.units = time.time() - first_ready
    result.units = [stats[u.index] for u in units]
    return stats


def pack_here(units: list[Unit], job: UnitJob) -> Iterator[dict]:
    """Each unit's stats, packed in this process in unit order."""
    packer = PackUnits(job, node=LOCAL_NODE)
    for unit in units:
        yield packer.pack(unit)


def pack_in_ray_data(units: list[Unit], job: UnitJob, cfg: DataprepConfig, result: RunResult) -> Iterator[dict]:
    """Each unit's stats as a Ray Data actor pool finishes it."""
    import ray

    pool, cpus = actor_pool(cfg, len(units))
    ds = ray.data.from_items([{"unit": u.to_json()} for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(PackUnits, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="pyarrow",
                        compute=pool, num_cpus=cpus)
    with closing(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))) as batches:
        for batch in batches:
            result.driver_received_bytes += batch.nbytes
            for text in batch.column("stats").to_pylist():
                yield json.loads(text)


def check_not_empty(stats: list[dict], cfg: DataprepConfig) -> None:
    if sum(st["splits"][s]["documents"] for st in stats for s in SPLITS) == 0:
        if sum(st["splits"][s].get("no_reply", 0) for st in stats for s in SPLITS):
            raise DataError(f"no conversation in {' '.join(cfg.input.paths)} has a reply token within a row of "
                            f"--seq-len {cfg.pack.seq_len} + 1 (their prompts fill the row); raise --seq-len")
        raise DataError(f"the corpus in {' '.join(cfg.input.paths)} has no documents (all files empty or skipped)")
    split = "val" if cfg.pack.val_fraction == 1 else "train"  # a held-out set for evaluation: val only
    if sum(st["splits"][split]["rows"] for st in stats) == 0:
        tokens = sum(st["splits"][split]["tokens"] for st in stats)
        raise DataError(f"the corpus has {tokens} {split} tokens, less than one row of --seq-len "
                        f"{cfg.pack.seq_len} + 1 in any unit; add text, lower --seq-len or raise --pack.unit_mb")


def split_entry(stats: list[dict], split: str, names: list[str]) -> dict:
    """A split's shards (each naming its unit and source) and counts; with several sources, also each one's."""
    entries = [st["splits"][split] for st in stats]
    entry = {
        "shards": [{**s, "unit": st["unit"]} for st in stats for s in st["splits"][split]["shards"]],
        **{k: sum(e[k] for e in entries) for k in entries[0] if k not in ("shards", "by_source")},
    }
    return {**entry, "by_source": counts_by_source(entries, names)} if len(names) > 1 else entry


def counts_by_source(entries: list[dict], names: list[str]) -> dict[str, dict]:
    """SOURCE_COUNTS of every source, by name, summed over the units' entries of a split (zero where it has none)."""
    totals = {name: dict.fromkeys(SOURCE_COUNTS, 0) for name in names}
    for entry in entries:
        for source, counts in entry["by_source"].items():
            for k in SOURCE_COUNTS:
                totals[names[int(source)]][k] += counts[k]
    return totals


def build_manifest(cfg: DataprepConfig, tokenizer: Tokenizer, trained: bool, stats: list[dict], settings: dict,
                   n_files: int, names: list[str]) -> dict:
    """Sizes, counts and per-shard entries (each naming its unit and source); small: the source file list is in
    sources.jsonl. `source_names[i]` names source i; `bos`: whether each document starts with BOS (`bos_id`). Chat
    and preference data have a `chat` entry; preference data's says `pairs` (each row's examples 2j+1 and 2j+2 are
    pair j's chosen and rejected replies), and its `documents` count pairs."""
    dtype = token_dtype(tokenizer.vocab_size)
    bos = settings.get("bos", False)
    splits = {s: split_entry(stats, s, names) for s in SPLITS}
    rows = planes(cfg) * (cfg.pack.seq_len + 1)
    pairs = {"pairs": True} if cfg.input.format == "preference" else {}
    chat = {"chat": {"template": tokenizer.chat_template_name, "overlong": cfg.pack.overlong,
                     "planes": list(PLANES), **pairs}} if cfg.input.format in EXAMPLE_FORMATS else {}
    return {**chat,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seq_len": cfg.pack.seq_len,
        "row_len": rows,
        "dtype": dtype.name,
        "rows_per_batch": rows_per_batch(rows, dtype),
        "seed": cfg.pack.seed,
        "val_fraction": cfg.pack.val_fraction,
        "tokenizer": {**tokenizer.describe(), "trained": trained},
        "bos": bos,
        "bos_id": tokenizer.bos_id if bos else None,
        "splits": splits,
        "units": len(stats),
        "input_bytes": sum(st["input_bytes"] for st in stats),
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "bad_records": sum(st["bad_records"] for st in stats),
        "replaced_utf8_documents": sum(st["replaced_utf8_documents"] for st in stats),
        "sources": {"file": SOURCES, "count": n_files},
        "source_names": names,
        "settings": settings,
    }


def print_summary(result: RunResult, n_files: int, output: str) -> None:
    m, row_len, t = result.manifest, result.manifest["row_len"], result.timings
    made = sum(sum(u["splits"][s]["tokens"] for s in SPLITS) for u in result.units)
    print(f"dataprep: {n_files:,} files -> {m['documents']:,} documents, {m['tokens']:,} tokens in {m['units']} units"
          f" ({len(result.units)} run now, {result.reused} reused from an earlier attempt)")
    if result.units:
        nodes = Counter(u["node"][:8] for u in result.units)
        print(f"  throughput: {made / max(t.units, 1e-9) / 1e6:.2f}M tokens/s read+tokenize+pack+write; units by node: "
              f"{', '.join(f'{node} x {n}' for node, n in sorted(nodes.items()))}; largest worker RSS "
              f"{max(u['peak_rss_mb'] for u in result.units):.0f} MB")
    print(f"  driver: {result.driver_cpu_s:.1f} CPU-s, {result.driver_received_bytes / 1e3:.1f} kB received, "
          f"peak RSS {peak_rss_mb():.0f} MB")
    print(f"  time: listing {t.listing:.1f}s, Ray start-up {t.ray_start:.1f}s, tokenizer {t.tokenizer:.1f}s, "
          f"worker start-up {t.workers_start:.1f}s, units {t.units:.1f}s")
    for name, s in m["splits"].items():
        size = sum(sh["bytes"] for sh in s["shards"]) / 1e6
        if "chat" in m:
            print(f"  {name:5s}: {example_counts(m, s, size)}")
            continue
        print(f"  {name:5s}: {s['documents']:,} docs, {s['rows']:,} rows x {row_len} tokens in {len(s['shards'])} "
              f"shards ({size:.1f} MB), {s['dropped_tokens']:,} tail tokens dropped")
    print(f"  tokenizer: vocab {m['tokenizer']['vocab_size']:,} ({'trained' if m['tokenizer']['trained'] else 'given'}), "
          f"{m['dtype']}; bad records skipped: {m['bad_records']}, "
          f"documents with invalid UTF-8 replaced: {m['replaced_utf8_documents']}")
    if len(m["source_names"]) > 1:
        rows = [f"{name} {c['rows']:,}" for name, c in m["splits"]["val"]["by_source"].items()]
        print(f"  val rows by source: {', '.join(rows)}")
    if m["splits"]["val"]["rows"] == 0:
        print("  warning: val/ has no full row; raise --val-fraction or lower --seq-len for a validation split")
    print(f"  dataset: {output}")


def example_counts(m: dict, s: dict, size: float) -> str:
    """A chat or preference split's counts for the summary (`size` MB of shards); a pair is never cut nor dropped
    (one that does not fit a row is a bad record)."""
    pairs = m["chat"].get("pairs", False)
    counts = (f"{s['documents']:,} {'pairs' if pairs else 'conversations'}, {s['rows']:,} rows of {m['seq_len'] + 1} "
              f"positions in {len(s['shards'])} shards ({size:.1f} MB), {s['loss_tokens']:,} of {s['tokens']:,} "
              f"tokens carry loss, {s['padding_tokens']:,} padding")
    if pairs:
        return counts
    return (f"{counts}; longer than a row: {s['truncated']:,} truncated, {s['dropped']:,} dropped "
            f"({m['chat']['overlong']}); {s['no_reply']:,} dropped: no room for a reply")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
