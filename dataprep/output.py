"""The dataset directory's life: made fresh, resumed, or left alone; finished by the manifest, written last.

One run writes a directory at a time: it holds the directory's lease (`lease.json`, raylm/lease.py) from before it
looks at the directory (so `--overwrite` clears nothing another live run writes) until it ends.

While a run is under way the directory holds `_progress/run.json` (the run's settings stamp and tokenizer) and one
commit record per finished unit. A re-run with the same settings keeps the tokenizer and every committed unit;
other settings are refused unless `--overwrite`. Finishing writes `sources.jsonl`, removes files no unit committed
(shards of interrupted attempts), writes `manifest.json` and then removes `_progress/`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from dataprep.units import Unit
from raylm import storage
from raylm.dataset import MANIFEST, read_manifest
from raylm.errors import ConfigError, StorageError
from raylm.lease import LEASE
from raylm.storage import FileEntry
from raylm.tokenizer import TOKENIZER_FILES

SPLITS = ("train", "val")
PROGRESS = "_progress"
"""Folder of the dataset directory holding the commit record of each finished unit until the manifest is written."""
SOURCES = "sources.jsonl"
RUN_RECORD = "run.json"
DATASET_ENTRIES = {*SPLITS, *TOKENIZER_FILES, MANIFEST, SOURCES, PROGRESS, LEASE}
"""What a dataset directory holds; dataprep writes into nothing else."""


def progress_path(output: str, unit: Unit) -> str:
    return storage.join(output, PROGRESS, f"{unit.name}.json")


def dataset_entry(name: str) -> bool:
    """Whether `name` belongs in a dataset directory: an entry, or one being written (a killed run's leftover)."""
    return name.split(storage.TEMPORARY)[0] in DATASET_ENTRIES


LENIENCY = ("on_bad_record", "encoding_errors")
"""Settings a run may change when it resumes: a unit is the same bytes under 'skip'/'replace' as under
'error'/'strict' if it met no bad record or invalid UTF-8 (`reusable` checks its counts), so the advice of a bad-record
error (pass --on-bad-record skip) resumes rather than starting over."""


def run_stamp(settings: dict, tokenizer_sha256: str) -> str:
    """What every unit of a run shares: the settings but LENIENCY, and the tokenizer."""
    kept = {k: v for k, v in settings.items() if k not in LENIENCY}
    return hashlib.sha256(json.dumps([kept, tokenizer_sha256], sort_keys=True).encode()).hexdigest()


def reusable(stats: dict, settings: dict) -> bool:
    """Whether a committed unit's bytes are what this run's leniency settings would write."""
    return not (stats["bad_records"] and settings["on_bad_record"] == "error") and \
        not (stats["replaced_utf8_documents"] and settings["encoding_errors"] == "strict")


def _changed(new: dict, old: dict, ignore: tuple[str, ...] = ()) -> str:
    return ", ".join(sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k) and k not in ignore))


def read_run_record(output: str) -> dict | None:
    path = storage.join(output, PROGRESS, RUN_RECORD)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def prepare_output(output: str, settings: dict, *, overwrite: bool) -> str:
    """'finished' (this exact dataset is there), 'resume' (an unfinished run with these settings) or 'fresh'."""
    old = None if overwrite else read_manifest(output)
    if old is not None and old["settings"] == settings:
        storage.delete_dir(storage.join(output, PROGRESS))  # a run killed between its manifest and this cleanup
        return "finished"
    if old is not None:
        raise ConfigError(f"{output} already holds a dataset made with other settings ({_changed(settings, old['settings'])} "
                          "differ); pass --overwrite to replace it or choose another --output")
    check_only_dataset_entries(output)
    run = None if overwrite else read_run_record(output)
    if run is not None and not _changed(settings, run["settings"], ignore=LENIENCY):
        write_run_record(output, settings, run["tokenizer_sha256"])
        return "resume"
    if run is not None:
        raise ConfigError(f"{output} holds an unfinished dataprep run with other settings ({_changed(settings, run['settings'])} "
                          "differ); run it again with its own settings to finish it, or pass --overwrite to start over")
    try:
        clear(output)
        storage.write_bytes(storage.join(output, ".raylm-write-check"), b"")
        storage.delete_file(storage.join(output, ".raylm-write-check"))
    except OSError as exc:
        raise StorageError(f"cannot write the output: {storage.describe_os_error(exc, output)}") from None
    except StorageError as exc:
        raise StorageError(f"cannot write the output: {exc}") from None
    return "fresh"


def check_only_dataset_entries(output: str) -> None:
    fs, root = storage.filesystem(output)
    try:
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot read the output: {storage.describe_os_error(exc, output)}") from None
    strangers = sorted(posixpath.basename(f.path) for f in found if not dataset_entry(posixpath.basename(f.path)))
    if strangers:
        raise ConfigError(f"{output} is not empty and not a raylm dataset (it holds {', '.join(strangers[:3])}"
                          f"{', …' if len(strangers) > 3 else ''}); choose a new or empty --output")


def clear(output: str) -> None:
    """Remove every dataset entry but the lease of the run that clears; the manifest goes first, so an interrupted
    clear is never taken as a dataset."""
    storage.delete_file(storage.join(output, MANIFEST))
    for name in (*SPLITS, PROGRESS):
        storage.delete_dir(storage.join(output, name))
    for name in _file_sizes(output):  # the tokenizer, sources.jsonl and any of them left half-written
        if name != LEASE:
            storage.delete_file(storage.join(output, name))


def has_committed_units(output: str) -> bool:
    """Whether an unfinished run here has finished any unit (then a failed run keeps its output to resume)."""
    return any(name != RUN_RECORD for name in _file_sizes(storage.join(output, PROGRESS)))


def write_run_record(output: str, settings: dict, tokenizer_sha256: str) -> None:
    record = {"settings": settings, "tokenizer_sha256": tokenizer_sha256}
    storage.write_bytes(storage.join(output, PROGRESS, RUN_RECORD), json.dumps(record, sort_keys=True).encode())


def _file_sizes(directory: str) -> dict[str, int]:
    """Name → size of the files directly under `directory` (one listing call, paginated on S3)."""
    fs, root = storage.filesystem(directory)
    try:
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as exc:
        raise StorageError(storage.describe_os_error(exc, directory)) from None
    return {posixpath.basename(f.path): f.size for f in found if f.type == pafs.FileType.File}


def committed_units(output: str, units: list[Unit], settings: dict, tokenizer_sha256: str) -> dict[int, dict]:
    """Stats of the units a previous attempt committed for this run, whose shards are all there at their recorded
    sizes and whose bytes these settings would write too (records read 32 at a time; shards checked against one
    listing per split)."""
    stamp = run_stamp(settings, tokenizer_sha256)
    records = _file_sizes(storage.join(output, PROGRESS))
    shards = {f"{split}/{name}": size for split in SPLITS for name, size in _file_sizes(storage.join(output, split)).items()}

    def read(unit: Unit) -> tuple[int, dict | None]:
        stats = json.loads(storage.read_bytes(progress_path(output, unit)))
        found = all(shards.get(s["file"]) == s["bytes"] for split in SPLITS for s in stats["stats"]["splits"][split]["shards"])
        ok = stats["stamp"] == unit.stamp(stamp) and found and reusable(stats["stats"], settings)
        return unit.index, stats["stats"] if ok else None

    with ThreadPoolExecutor(32) as pool:
        found = pool.map(read, [u for u in units if f"{u.name}.json" in records])
        return {index: stats for index, stats in found if stats is not None}


SOURCES_LINES = 10_000
"""Lines of sources.jsonl encoded and written at a time."""


def write_sources(output: str, files: list[FileEntry]) -> None:
    """The full source list, one JSON line a file, beside the manifest (provenance; `open_dataset` never reads it).
    Streamed SOURCES_LINES lines at a time (on S3 a multipart upload), never held as one string: a corpus of
    millions of files lists hundreds of MB. Locally under a temporary name, renamed when complete."""
    path = storage.join(output, SOURCES)
    fs, p = storage.filesystem(path)
    tmp = p if storage.is_s3(path) else storage.temporary_name(p)
    with fs.open_output_stream(tmp, compression=None) as out:
        for lo in range(0, len(files), SOURCES_LINES):
            out.write("".join(json.dumps({"path": f.path, "size": f.size}) + "\n"
                              for f in files[lo:lo + SOURCES_LINES]).encode())
    if tmp != p:
        fs.move(tmp, p)


def remove_strays(output: str, kept: set[str]) -> None:
    """Delete what interrupted attempts left: files under train/ and val/ that no committed unit wrote, and files
    half-written at the top (a run killed while writing its tokenizer or source list)."""
    strays = [storage.join(output, split, name) for split in SPLITS for name in _file_sizes(storage.join(output, split))
              if f"{split}/{name}" not in kept]
    strays += [storage.join(output, name) for name in _file_sizes(output) if storage.TEMPORARY in name]
    for path in strays:
        storage.delete_file(path)


def write_manifest(output: str, manifest: dict) -> None:
    storage.write_bytes(storage.join(output, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    storage.delete_dir(storage.join(output, PROGRESS))


def remove_unfinished(output: str) -> None:
    """After a failed run with nothing worth resuming: the output as the run found it, but for the run's lease (and,
    for an output that did not exist, the folder holding it: `storage.delete_empty_dir` once the lease is gone)."""
    clear(output)
