"""Corpus files → documents: format by suffix, transparent .gz/.zst, and bad records reported as data.

Readers never raise on bad input. They yield a `BadRecord` naming the file (and line or row) instead, so the
driver decides, in corpus order, whether to stop with that one line or skip and count it; a Ray worker never
dies with a traceback for a user's file.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from raylm.storage import FileEntry, filesystem

TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .tex .py .pyi .c .h .cc .cpp .hpp .cu .java .kt .scala .go .rs .js .ts .jsx .tsx "
    ".rb .php .pl .lua .r .jl .swift .m .cs .sh .bash .zsh .sql .html .htm .css .xml .yaml .yml .toml .ini .cfg "
    ".csv .tsv".split()
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PARQUET_SUFFIXES = frozenset({".parquet"})
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


@dataclass(frozen=True)
class Document:
    key: str
    """Stable identity (relative path, plus line/row) used for the train/val split."""
    text: str
    replaced_utf8: bool = False


@dataclass(frozen=True)
class BadRecord:
    where: str
    """File, and line or row when known."""
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


def _read_all(path: str) -> bytes:
    fs, p = filesystem(path)
    _, compression = split_suffix(path)
    with fs.open_input_stream(p, compression=compression) as f:
        return f.read()


def _decode(data: bytes, where: str, encoding_errors: str) -> tuple[str | None, bool, BadRecord | None]:
    """(text, replaced, bad record) for raw bytes that should be UTF-8 text."""
    if b"\x00" in data:
        return None, False, BadRecord(where, "binary data (NUL bytes), not text; remove the file or narrow the input glob")
    try:
        return data.decode("utf-8"), False, None
    except UnicodeDecodeError as exc:
        if encoding_errors == "replace":
            return data.decode("utf-8", errors="replace"), True, None
        return None, False, BadRecord(
            where, f"invalid UTF-8 at byte {exc.start}; fix the file or pass --encoding-errors replace"
        )


def _text_documents(entry: FileEntry, key: str, data: bytes, encoding_errors: str) -> Iterator:
    text, replaced, bad = _decode(data, entry.path, encoding_errors)
    if bad:
        yield bad
    elif text:
        yield Document(key, text, replaced)


def _jsonl_documents(entry: FileEntry, key: str, data: bytes, text_field: str, encoding_errors: str) -> Iterator:
    for lineno, raw in enumerate(io.BytesIO(data), start=1):
        if not raw.strip():
            continue
        where = f"{entry.path}:{lineno}"
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
            yield Document(f"{key}:{lineno}", text, replaced)


def _parquet_documents(entry: FileEntry, key: str, data: bytes, text_field: str) -> Iterator:
    schema = pq.read_schema(pa.BufferReader(data))
    if text_field not in schema.names:
        yield BadRecord(entry.path, f"no column {text_field!r} (columns: {', '.join(schema.names)}); set --text-field")
        return
    column = pq.read_table(pa.BufferReader(data), columns=[text_field]).column(0)
    for row, text in enumerate(column.to_pylist()):
        if not isinstance(text, str):
            yield BadRecord(f"{entry.path}#row{row}", f"column {text_field!r} is {text!r}, not text; pass --on-bad-record skip")
        elif text:
            yield Document(f"{key}#{row}", text)


def read_documents(entry: FileEntry, key: str, *, text_field: str, encoding_errors: str) -> Iterator:
    """Documents and bad records of one file, in file order. `key` is the file's stable identity for splitting."""
    try:
        data = _read_all(entry.path)
    except (OSError, pa.ArrowException) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        yield BadRecord(entry.path, f"cannot read or decompress ({first_line}); re-download or remove the file")
        return
    fmt = file_format(entry.path) or "text"
    try:
        if fmt == "jsonl":
            yield from _jsonl_documents(entry, key, data, text_field, encoding_errors)
        elif fmt == "parquet":
            yield from _parquet_documents(entry, key, data, text_field)
        else:
            yield from _text_documents(entry, key, data, encoding_errors)
    except (OSError, pa.ArrowException) as exc:
        yield BadRecord(entry.path, f"not a readable {fmt} file ({str(exc).splitlines()[0]}); fix or remove it")
