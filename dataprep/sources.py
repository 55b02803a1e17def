"""Corpus files → documents, streamed: format by suffix, transparent .gz/.zst, bad records reported as data.

Memory never grows with a file's size: `.jsonl` is read line by line, `.parquet` row group by row group, compressed
files through an incremental decompressor, and one huge plain-text document comes out in chunks of CHUNK_CHARS
(`Document.ends` False on all but the last). A work unit may be a piece of one big file (`Part`): a byte range of an
uncompressed .jsonl (a line belongs to the range its first byte is in) or a range of row groups of a .parquet.

Readers never raise on bad input. They yield a `BadRecord` naming the file (and line, byte or row) instead, so the
caller decides whether to stop with that one line or skip and count it; a Ray worker never dies with a traceback
for a user's file. A plain-text document found bad after its first chunk (invalid UTF-8 or a NUL byte past the
first MB) keeps its chunks so far, ends there, and is counted as a bad record.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from raylm.storage import filesystem

TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .tex .py .pyi .c .h .cc .cpp .hpp .cu .java .kt .scala .go .rs .js .ts .jsx .tsx "
    ".rb .php .pl .lua .r .jl .swift .m .cs .sh .bash .zsh .sql .html .htm .css .xml .yaml .yml .toml .ini .cfg "
    ".csv .tsv".split()
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PARQUET_SUFFIXES = frozenset({".parquet"})
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
READ_BYTES = 1 << 20
"""Bytes per read call: the most a reader holds besides the current line, row group or text chunk."""
CHUNK_CHARS = 1 << 20
"""Characters of one plain-text document handed to the tokenizer at once."""
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Part:
    """A file, or a piece of one big file, that a work unit reads."""

    path: str
    size: int
    """Size of the whole file."""
    key: str
    """Stable identity of the file (relative to its input) for the train/val split."""
    start: int = 0
    """First byte (.jsonl) or first row group (.parquet) of the piece."""
    end: int | None = None
    """End byte or row group, exclusive; None = the end of the file."""
    first_row: int = 0
    """Parquet: index in the file of the first row of row group `start` (rows are keyed by it)."""


@dataclass(frozen=True)
class Document:
    key: str
    """Stable identity (file key, plus byte offset or row) used for the train/val split."""
    text: str
    replaced_utf8: bool = False
    ends: bool = True
    """False when more text of the same document follows (a chunk of a huge plain-text file)."""


@dataclass(frozen=True)
class BadRecord:
    where: str
    """File, and line, byte or row when known."""
    reason: str
    """What is wrong and what to do."""


def split_suffix(path: str) -> tuple[str, str | None]:
    """(format suffix, compression) of a path, e.g. ('.jsonl', 'zstd') for 'a/b.jsonl.zst'."""
    stem, ext = os.path.splitext(path.lower())
    compression = COMPRESSIONS.get(ext)
    if compression:
        ext = os.path.splitext(stem)[1]
    return ext, compression


def file_format(path: str) -> str | None:
    """'text', 'jsonl', 'parquet', or None for a file raylm does not read (images, archives, …)."""
    ext, _ = split_suffix(path)
    if ext in JSONL_SUFFIXES:
        return "jsonl"
    if ext in PARQUET_SUFFIXES:
        return "parquet"
    if ext in TEXT_SUFFIXES:
        return "text"
    return None


def splittable(path: str) -> bool:
    """Whether a big file can be cut into several units: uncompressed .jsonl (by bytes) and .parquet (row groups)."""
    fmt, compression = file_format(path), split_suffix(path)[1]
    return compression is None and fmt in ("jsonl", "parquet")


def _blocks(part: Part) -> Iterator[bytes]:
    """The bytes of a file (decompressed) from `part.start`, a block at a time."""
    fs, p = filesystem(part.path)
    compression = split_suffix(part.path)[1]
    if part.start:
        with fs.open_input_file(p) as f:
            f.seek(part.start)
            while block := f.read(READ_BYTES):
                yield block
        return
    with fs.open_input_stream(p, compression=compression) as f:
        while block := f.read(READ_BYTES):
            yield block


def _lines(part: Part) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of the lines that start in the part's byte range."""
    offset, pending, end = part.start, b"", part.end
    blocks = _blocks(Part(part.path, part.size, part.key, max(part.start - 1, 0)))
    if part.start:  # the line the range starts inside belongs to the previous range: skip to just after its '\n'
        offset -= 1
    skip = part.start > 0
    for block in blocks:
        pending += block
        lines = pending.split(b"\n")
        pending = lines.pop()
        for line in lines:
            if skip:
                skip = False
            elif end is not None and offset >= end:
                return
            else:
                yield offset, line
            offset += len(line) + 1
    if pending and not skip and (end is None or offset < end):
        yield offset, pending


def _decode(data: bytes, where: str, encoding_errors: str) -> tuple[str | None, bool, BadRecord | None]:
    """(text, replaced, bad record) for raw bytes that should be UTF-8 text."""
    if b"\x00" in data:
        return None, False, BadRecord(where, "binary data (NUL bytes), not text; remove the file or narrow the input glob")
    try:
        return data.decode("utf-8"), False, None
    except UnicodeDecodeError as exc:
        if encoding_errors == "replace":
            return data.decode("utf-8", errors="replace"), True, None
        return None, False, BadRecord(where, f"invalid UTF-8 at byte {exc.start}; fix the file or pass --encoding-errors replace")


def _text_documents(part: Part, encoding_errors: str) -> Iterator:
    """One document per file, yielded in chunks of about CHUNK_CHARS, cut after a newline where there is one."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    text, replaced, offset, started = "", False, 0, False
    for block in _blocks(part):
        if b"\x00" in block:
            yield BadRecord(part.path, "binary data (NUL bytes), not text; remove the file or narrow the input glob")
            break
        try:
            text += decoder.decode(block)
        except UnicodeDecodeError as exc:
            if encoding_errors != "replace":
                yield BadRecord(part.path, f"invalid UTF-8 at byte {offset + exc.start}; fix the file or pass "
                                           "--encoding-errors replace")
                break
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text += decoder.decode(block)
            replaced = True
        offset += len(block)
        while len(text) >= 2 * CHUNK_CHARS:
            cut = text.rfind("\n", 0, CHUNK_CHARS) + 1 or CHUNK_CHARS
            yield Document(part.key, text[:cut], replaced, ends=False)
            text, started = text[cut:], True
    else:
        try:
            text += decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            if encoding_errors != "replace":
                yield BadRecord(part.path, f"invalid UTF-8 at byte {offset}: the file ends inside a character; fix "
                                           "the file or pass --encoding-errors replace")
                text = ""
            else:
                text, replaced = text + "\ufffd", True
    if text or started:
        yield Document(part.key, text, replaced)


def _jsonl_documents(part: Part, text_field: str, encoding_errors: str) -> Iterator:
    for lineno, (offset, raw) in enumerate(_lines(part), start=1):
        if not raw.strip():
            continue
        where = f"{part.path}:{lineno}" if part.start == 0 else f"{part.path} (line at byte {offset})"
        line, replaced, bad = _decode(raw, where, encoding_errors)
        if bad:
            yield bad
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield BadRecord(where, f"not valid JSON ({exc.msg}); fix the line or pass --on-bad-record skip")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            yield BadRecord(where, f"no string field {text_field!r}; set --text-field or pass --on-bad-record skip")
        elif text:
            yield Document(f"{part.key}@{offset}", text, replaced)


def open_parquet(path: str) -> pq.ParquetFile:
    """A parquet file read lazily (row groups on demand); a compressed one is decompressed into memory first."""
    fs, p = filesystem(path)
    compression = split_suffix(path)[1]
    if compression:
        with fs.open_input_stream(p, compression=compression) as f:
            return pq.ParquetFile(pa.BufferReader(f.read()))
    return pq.ParquetFile(fs.open_input_file(p))


def _parquet_documents(part: Part, text_field: str) -> Iterator:
    parquet = open_parquet(part.path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        yield BadRecord(part.path, f"no column {text_field!r} (columns: {', '.join(names)}); set --text-field")
        return
    groups = range(part.start, parquet.num_row_groups if part.end is None else part.end)
    row = part.first_row
    for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, row_groups=list(groups), columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                yield BadRecord(f"{part.path}#row{row}", f"column {text_field!r} is {text!r}, not text; "
                                                         "pass --on-bad-record skip")
            elif text:
                yield Document(f"{part.key}#{row}", text)
            row += 1


def read_documents(part: Part, *, text_field: str, encoding_errors: str) -> Iterator:
    """Documents and bad records of one file or piece of one, in file order, streamed."""
    fmt = file_format(part.path) or "text"
    try:
        if fmt == "jsonl":
            yield from _jsonl_documents(part, text_field, encoding_errors)
        elif fmt == "parquet":
            yield from _parquet_documents(part, text_field)
        else:
            yield from _text_documents(part, encoding_errors)
    except (OSError, pa.ArrowException) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = "cannot read or decompress" if fmt != "parquet" else "not a readable parquet file"
        yield BadRecord(part.path, f"{what} ({first_line}); re-download, fix or remove the file")
