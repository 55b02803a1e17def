"""Work units: the corpus cut into pieces of about `pack.unit_mb` input bytes, fixed by the input alone.

A unit is a run of consecutive files of the sorted listing; a file bigger than a unit that can be cut (uncompressed
.jsonl by bytes, .parquet by row groups) becomes several units of its own. Nothing here looks at the cluster, so
the same corpus and settings give the same units, and so the same shards, on a laptop and on 100 nodes.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa

from dataprep.sources import Part, file_format, open_parquet, splittable
from raylm.storage import FileEntry


@dataclass(frozen=True)
class Unit:
    index: int
    parts: tuple[Part, ...]
    input_bytes: int

    @property
    def name(self) -> str:
        """Stem of the unit's shard files and of its commit record."""
        return f"unit-{self.index:06d}"

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "parts": [asdict(p) for p in self.parts], "input_bytes": self.input_bytes})

    @classmethod
    def from_json(cls, text: str) -> "Unit":
        data = json.loads(text)
        return cls(data["index"], tuple(Part(**p) for p in data["parts"]), data["input_bytes"])

    def stamp(self, run_stamp: str) -> str:
        """What a finished unit must match to be reused: the run's settings and tokenizer, and this unit's parts."""
        return hashlib.sha256(f"{run_stamp}\0{self.to_json()}".encode()).hexdigest()


def _part(f: FileEntry, start: int = 0, end: int | None = None, first_row: int = 0) -> Part:
    """A file, or a piece of it, carrying the file's source."""
    return Part(f.path, f.size, f.key, start, end, first_row, source=f.source)


def _byte_ranges(f: FileEntry, unit_bytes: int) -> list[tuple[Part, int]]:
    return [(_part(f, start, min(start + unit_bytes, f.size)), min(unit_bytes, f.size - start))
            for start in range(0, f.size, unit_bytes)]


def _row_group_ranges(f: FileEntry, unit_bytes: int) -> list[tuple[Part, int]]:
    """Consecutive row groups of a big .parquet file, up to `unit_bytes` of column data each; the whole file as one
    part if its footer does not read (its unit then reports it as a bad record, as for any file)."""
    try:
        meta = open_parquet(f.path).metadata
    except (OSError, pa.ArrowException):
        return [(_part(f), f.size)]
    parts, start, first_row, rows, size = [], 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        rows, size = rows + group.num_rows, size + group.total_byte_size
        if size >= unit_bytes or g == meta.num_row_groups - 1:
            parts.append((_part(f, start, g + 1, first_row), size))
            start, first_row, rows, size = g + 1, first_row + rows, 0, 0
    return parts


def pieces(f: FileEntry, unit_bytes: int) -> list[tuple[Part, int]]:
    """(part, its input bytes) of a file: itself, or byte ranges / row-group ranges when it is big and cuttable."""
    if f.size <= unit_bytes or not splittable(f.path):
        return [(_part(f), f.size)]
    if file_format(f.path) == "jsonl":
        return _byte_ranges(f, unit_bytes)
    return _row_group_ranges(f, unit_bytes)


FOOTER_READS = 32
"""Big .parquet footers read at a time when planning: each is a request or two, latency on object storage."""


def _all_pieces(files: list[FileEntry], unit_bytes: int) -> list[list[tuple[Part, int]]]:
    """`pieces` of every file, in order; those of .parquet files (a big one's footer is read: a request or two,
    latency on object storage) FOOTER_READS at a time, so a (re)plan over thousands of them does not wait for each
    in turn."""
    parquet = [i for i, f in enumerate(files) if file_format(f.path) == "parquet"]
    with ThreadPoolExecutor(max_workers=FOOTER_READS, thread_name_prefix="raylm-footers") as pool:
        read = dict(zip(parquet, pool.map(lambda i: pieces(files[i], unit_bytes), parquet)))
    return [read[i] if i in read else pieces(f, unit_bytes) for i, f in enumerate(files)]


def plan_units(files: list[FileEntry], unit_bytes: int) -> list[Unit]:
    """Consecutive files grouped up to `unit_bytes`; a big cuttable file's pieces are units of their own."""
    units: list[Unit] = []
    current: list[Part] = []
    size = 0

    def close() -> None:
        nonlocal current, size
        if current:
            units.append(Unit(len(units), tuple(current), size))
            current, size = [], 0

    for f, parts in zip(files, _all_pieces(files, unit_bytes)):
        if len(parts) > 1 or (current and size + f.size > unit_bytes):
            close()
        for part, part_bytes in parts:
            current.append(part)
            size += part_bytes
            if len(parts) > 1:
                close()
    close()
    return units
