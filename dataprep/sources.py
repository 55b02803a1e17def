"""Corpus files → documents, streamed: format by suffix, transparent .gz/.zst, bad records reported as data.

Memory never grows with a file's size: `.jsonl` is read line by line, `.parquet` row group by row group, compressed
files through an incremental decompressor, and a huge document (a plain-text file, or one long line or value) comes
out in chunks of about CHUNK_CHARS (`Document.ends` False on all but the last). Two limits remain: one line of a
.jsonl (or one parquet value) is held whole while it is parsed, and a compressed .parquet (.parquet.gz), which has
no random access, is decompressed into memory. A work unit may be a piece of one big file (`Part`): a byte range of an
uncompressed .jsonl (a line belongs to the range its first byte is in) or a range of row groups of a .parquet.

Readers never raise on bad input (a storage error is not bad input: it raises). They yield a `BadRecord` naming the file (and line, byte or row) instead, so the
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

from raylm import storage
from raylm.errors import StorageError
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
    source: int = 0
    """Id of the source (input) the file belongs to: a unit packs each source's documents into rows of their own."""


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
    """(byte offset, line) of the lines that start in the part's byte range. A line longer than a block is kept as
    a list of pieces until its end, so no byte is scanned twice."""
    skip = part.start > 0  # the line the range starts inside belongs to the previous range: skip to after its '\n'
    offset, carry = max(part.start - 1, 0), []
    for block in _blocks(Part(part.path, part.size, part.key, offset)):
        lines = block.split(b"\n")
        if len(lines) == 1:
            carry.append(block)
            continue
        lines[0], carry = b"".join(carry) + lines[0], [lines.pop()]
        for line in lines:
            if skip:
                skip = False
            elif part.end is not None and offset >= part.end:
                return
            else:
                yield offset, line
            offset += len(line) + 1
    last = b"".join(carry)
    if last and not skip and (part.end is None or offset < part.end):
        yield offset, last


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
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, offset, started, replaced, bad = "", 0, False, False, None
    for block in _blocks(part):
        if b"\x00" in block:
            bad = BadRecord(part.path, "binary data (NUL bytes), not text; remove the file or narrow the input glob")
            break
        try:
            text += decoder.decode(block)
        except UnicodeDecodeError as exc:
            if encoding_errors != "replace":
                bad = BadRecord(part.path, f"invalid UTF-8 at byte {offset + exc.start}; fix the file or pass "
                                           "--encoding-errors replace")
                break
            held = decoder.getstate()[0]  # a character begun in the last block, which a failed call leaves as it was
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text, replaced = text + decoder.decode(held + block), True
        offset += len(block)
        for chunk in _chunks(text):
            yield Document(part.key, chunk, replaced, ends=False)
            text, started = text[len(chunk):], True
    else:
        try:
            text += decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            if encoding_errors != "replace":
                bad = BadRecord(part.path, f"invalid UTF-8 at byte {offset}: the file ends inside a character; fix "
                                           "the file or pass --encoding-errors replace")
            text, replaced = text + "\ufffd", True
    if bad:
        yield bad
    if started or (text and not bad):  # a document begun is ended; one found bad before any chunk is left out
        yield Document(part.key, "" if bad else text, replaced)


def _chunks(text: str) -> Iterator[str]:
    """Leading chunks of about CHUNK_CHARS, cut after a newline where there is one, while 2 x CHUNK_CHARS remain:
    the tokenizer never gets more than that at once, and the rest waits for more text (or the document's end)."""
    while len(text) >= 2 * CHUNK_CHARS:
        cut = text.rfind("\n", 0, CHUNK_CHARS) + 1 or CHUNK_CHARS
        yield text[:cut]
        text = text[cut:]


def split_long(doc: Document) -> Iterator[Document]:
    """A document of more than 2 x CHUNK_CHARS (one huge .jsonl line or parquet value) as chunks, so a worker
    encodes at most that much at once."""
    if len(doc.text) < 2 * CHUNK_CHARS:
        yield doc
        return
    rest = doc.text
    for chunk in _chunks(doc.text):
        yield Document(doc.key, chunk, doc.replaced_utf8, ends=False)
        rest = rest[len(chunk):]
    yield Document(doc.key, rest, doc.replaced_utf8, ends=doc.ends)


@dataclass(frozen=True)
class Record:
    """One parsed line of a .jsonl file."""

    key: str
    """Stable identity (file key and byte offset) used for the train/val split."""
    where: str
    """File and line, for error messages."""
    value: object
    replaced_utf8: bool = False


def jsonl_records(part: Part, encoding_errors: str) -> Iterator[Record | BadRecord]:
    """The JSON value of each non-blank line of a .jsonl file or byte range of one, or a BadRecord for a line that
    is not UTF-8 or not JSON."""
    for lineno, (offset, raw) in enumerate(_lines(part), start=1):
        if not raw.strip():
            continue
        where = f"{part.path}:{lineno}" if part.start == 0 else f"{part.path} (line at byte {offset})"
        line, replaced, bad = _decode(raw, where, encoding_errors)
        if bad:
            yield bad
            continue
        try:
            yield Record(f"{part.key}@{offset}", where, json.loads(line), replaced)
        except json.JSONDecodeError as exc:
            yield BadRecord(where, f"not valid JSON ({exc.msg}); fix the line or pass --on-bad-record skip")


def _jsonl_documents(part: Part, text_field: str, encoding_errors: str) -> Iterator:
    for record in jsonl_records(part, encoding_errors):
        if isinstance(record, BadRecord):
            yield record
            continue
        text = record.value.get(text_field) if isinstance(record.value, dict) else None
        if not isinstance(text, str):
            yield BadRecord(record.where, f"no string field {text_field!r}; set --text-field or pass "
                                          "--on-bad-record skip")
        elif text:
            yield Document(record.key, text, record.replaced_utf8)


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


DECOMPRESSION_ERRORS = ("Truncated compressed stream", "decompress", "inflate", "Corrupt")
"""What pyarrow's codecs say (as an OSError) of a corrupt .gz/.zst: a bad file, unlike an I/O error."""


def read_documents(part: Part, *, text_field: str, encoding_errors: str) -> Iterator:
    """Documents and bad records of one file or piece of one, in file order, streamed. A file that is not what its
    suffix says is a bad record; a storage error (S3 unreachable, a disk failing) is raised, so the unit is not
    committed and a re-run redoes it."""
    fmt = file_format(part.path) or "text"
    if fmt == "jsonl":
        documents = _jsonl_documents(part, text_field, encoding_errors)
    elif fmt == "parquet":
        documents = _parquet_documents(part, text_field)
    else:
        return _guarded(part, fmt, _text_documents(part, encoding_errors))
    return _guarded(part, fmt, (d for doc in documents for d in (split_long(doc) if isinstance(doc, Document)
                                                                 else (doc,))))


def read_records(part: Part, *, encoding_errors: str) -> Iterator:
    """Parsed lines (`Record`) and bad records of a .jsonl file or piece of one, in file order, streamed."""
    return _guarded(part, "jsonl", jsonl_records(part, encoding_errors))


def _guarded(part: Part, fmt: str, records: Iterator) -> Iterator:
    """`records`, with a file that is not what its suffix says (or a corrupt compressed one) as a bad record."""
    try:
        yield from records
    except pa.ArrowInvalid as exc:
        yield BadRecord(part.path, f"not a readable {fmt} file ({_first_line(exc)}); fix or remove it")
    except OSError as exc:
        if not any(marker in str(exc) for marker in DECOMPRESSION_ERRORS):
            raise StorageError(storage.describe_os_error(exc, part.path)) from None
        yield BadRecord(part.path, f"cannot read or decompress ({_first_line(exc)}); re-download or remove the file")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
