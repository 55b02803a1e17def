"""Reading a finished dataset: `open_dataset(DIR)` → rows of `train`/`val` as numpy arrays.

A directory is a dataset only if its `manifest.json` exists (it is written last). Rows are fixed-size, so each is
read with one ranged read of just its bytes (pread locally, a ranged GET on S3), several in flight.
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from raylm import storage
from raylm.errors import DataError, StorageError

MANIFEST = "manifest.json"
FORMAT = "raylm-packed-tokens"
FORMAT_VERSION = 2

PLANES = ("tokens", "example", "loss")
"""The planes of a row of chat data, each `seq_len + 1` long: token ids; the example each position belongs to (1, 2,
… within the row, 0 for padding); whether the token at that position is a target that carries loss. Preference data
(`PackedDataset.pairs`) has the same planes, a pair's two examples side by side in one row."""

BATCH_BYTES = 1 << 20
"""Target size of one record batch: the unit of a ranged read on S3."""


def shard_schema(dtype: np.dtype, row_len: int) -> pa.Schema:
    return pa.schema([pa.field("tokens", pa.list_(pa.from_numpy_dtype(dtype), row_len))])


def rows_per_batch(row_len: int, dtype: np.dtype) -> int:
    return max(1, BATCH_BYTES // (row_len * dtype.itemsize))


def read_manifest(directory: str) -> dict | None:
    """The manifest of a finished dataset at `directory`, or None if there is none (not a dataset, or unfinished)."""
    path = storage.join(directory, MANIFEST)
    try:
        if not storage.exists(path):
            return None
        manifest = json.loads(storage.read_bytes(path))
    except OSError as exc:
        raise StorageError(storage.describe_os_error(exc, path)) from None
    except ValueError:
        raise DataError(f"{path} is not valid JSON; re-run dataprep with --overwrite") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a raylm v{FORMAT_VERSION} dataset manifest; re-run dataprep with --overwrite")
    return manifest


BLOCK = np.dtype([("offset", "<i8"), ("meta", "<i4"), ("pad", "<i4"), ("body", "<i8")])
"""An Arrow IPC footer's Block: where a record batch's message starts, its metadata and body lengths."""
ARROW_INT, ARROW_FIXED_SIZE_LIST, ARROW_RECORD_BATCH = 2, 16, 3
"""The flatbuffer union tags raylm's shards use: Type.Int, Type.FixedSizeList, MessageHeader.RecordBatch."""


class _Footer:
    """Where the token values of each record batch of an Arrow IPC shard start, parsed from the file's footer (a
    flatbuffer) by hand: pyarrow reads only whole record batches (~1 MB), and a random row needs just its bytes.

    Nothing read is trusted that the offsets depend on: the schema must be one fixed_size_list<dtype>[row_len]
    column, little-endian; every block must hold the rows the manifest says (rows_per_batch, the last one the rest)
    with no nulls and no compression. The first and last batches' messages are read and checked field by field
    (row count, null counts, buffers, compression); every other block's footer entry must equal the first's (a batch
    of another size, with a validity buffer (nulls) or compressed buffers has another body length), and each block
    must start where the one before it ends. A mismatch is a one-line DataError naming the shard, never wrong rows.
    So verified, batch i's values start at `first + i * stride`: two ints a shard, however many batches it has."""

    __slots__ = ("path", "row_len", "dtype", "bytes_read", "first", "stride")

    def __init__(self, file, path: str, *, size: int, rows: int, rows_per_batch: int, row_len: int, dtype: np.dtype):
        self.path, self.bytes_read = path, 0
        self.row_len, self.dtype = row_len, dtype
        batches = -(-rows // rows_per_batch)
        footer = self._footer_bytes(file, size, batches)
        self._check_schema(footer, _table(footer, _field(footer, _root(footer), 1)))  # Footer.schema
        start, count = _vector(footer, _field(footer, _root(footer), 3))  # Footer.recordBatches: [Block]
        if count != batches:
            self._fail(f"has {count} record batches where the manifest's {rows} rows in batches of "
                       f"{rows_per_batch} make {batches}")
        blocks = np.frombuffer(footer, dtype=BLOCK, count=count, offset=start)
        values_at = self._check_batch(file, blocks[0], min(rows, rows_per_batch))
        if count > 1 and (self._check_batch(file, blocks[-1], rows - (count - 1) * rows_per_batch) != values_at
                          or blocks[-1]["meta"] != blocks[0]["meta"]):
            self._fail("has a last record batch laid out unlike its first")
        full = blocks[: count - 1]
        unlike = np.flatnonzero((full["meta"] != blocks[0]["meta"]) | (full["body"] != blocks[0]["body"]))
        if len(unlike):
            self._fail(f"has a record batch ({unlike[0]}) unlike its first: another batch size, nulls or compression")
        self.first = int(blocks[0]["offset"] + blocks[0]["meta"]) + values_at
        """File offset of the first batch's first token value."""
        self.stride = int(blocks[0]["meta"] + blocks[0]["body"])
        """Bytes from one batch's start to the next's."""
        if np.any(np.diff(blocks["offset"]) != self.stride):
            self._fail("has record batches that do not follow each other")

    def _fail(self, what: str):
        raise DataError(f"shard {self.path} {what}; it is not a shard this dataset's manifest describes: re-run "
                        "dataprep")

    def _footer_bytes(self, file, size: int, batches: int) -> bytes:
        want = min(size, 24 * batches + 4096)  # a Block is 24 bytes; the schema and the rest fit in 4 KB
        tail = file.read_at(want, size - want)
        self.bytes_read += len(tail)
        if len(tail) < 10 or tail[-6:] != b"ARROW1":
            raise DataError(f"shard {self.path} is not an Arrow IPC file (cut short?); re-run dataprep")
        length = struct.unpack_from("<i", tail, len(tail) - 10)[0]
        if length + 10 > len(tail):
            tail = file.read_at(length + 10, size - length - 10)
            self.bytes_read += len(tail)
        return tail[len(tail) - 10 - length: len(tail) - 10]

    def _check_schema(self, buf: bytes, schema: int) -> None:
        """One column, fixed_size_list<manifest dtype>[row_len], little-endian."""
        endianness = _field(buf, schema, 0)
        if endianness is not None and struct.unpack_from("<h", buf, endianness)[0] != 0:
            self._fail("is big-endian")
        fields = [_table(buf, f) for f in _elements(buf, _field(buf, schema, 1))]
        kind = _scalar(buf, fields[0], 2, "<B") if len(fields) == 1 else None
        size = _scalar(buf, _table(buf, _field(buf, fields[0], 3)), 0, "<i") if kind == ARROW_FIXED_SIZE_LIST else None
        if size != self.row_len:
            self._fail(f"does not hold one column of fixed-size lists of {self.row_len} tokens")
        children = [_table(buf, f) for f in _elements(buf, _field(buf, fields[0], 5))]
        value = _table(buf, _field(buf, children[0], 3)) if _scalar(buf, children[0], 2, "<B") == ARROW_INT else None
        bits = _scalar(buf, value, 0, "<i") if value is not None else None
        signed = bool(_scalar(buf, value, 1, "<B")) if value is not None else None
        if (bits, signed) != (8 * self.dtype.itemsize, self.dtype.kind == "i"):
            found = f"{'' if signed else 'u'}int{bits}" if bits else "non-integer"
            self._fail(f"holds {found} tokens where the manifest says {self.dtype}")

    def _check_batch(self, file, block, rows: int) -> int:
        """Check one batch's message: `rows` rows, no nulls, no compression, the buffers raylm's writer writes
        ([list validity, values validity, values], the validity ones empty). Returns the values' offset in the
        body."""
        offset, meta_len, body = int(block["offset"]), int(block["meta"]), int(block["body"])
        meta = file.read_at(meta_len, offset)
        self.bytes_read += len(meta)
        message = meta[8:] if meta[:4] == b"\xff\xff\xff\xff" else meta[4:]  # continuation marker, then length
        if _scalar(message, _root(message), 1, "<B") != ARROW_RECORD_BATCH:  # Message.header_type
            self._fail(f"has a block at byte {offset} that is not a record batch")
        batch = _table(message, _field(message, _root(message), 2))  # Message.header: the RecordBatch table
        if _field(message, batch, 3) is not None:  # RecordBatch.compression
            self._fail("is compressed; raylm reads uncompressed shards")
        length = _scalar(message, batch, 0, "<q")
        if length != rows:
            self._fail(f"has a record batch of {length} rows where the manifest says {rows}")
        start, count = _vector(message, _field(message, batch, 1))  # RecordBatch.nodes: [FieldNode]
        nodes = [struct.unpack_from("<qq", message, start + 16 * i) for i in range(count)]
        start, count = _vector(message, _field(message, batch, 2))  # RecordBatch.buffers: [Buffer]
        buffers = [struct.unpack_from("<qq", message, start + 16 * i) for i in range(count)]
        values = rows * self.row_len * self.dtype.itemsize
        if any(nulls for _, nulls in nodes) or len(buffers) != 3 or buffers[0][1] or buffers[1][1]:
            self._fail("has nulls (or buffers raylm's writer never writes)")
        if buffers[2][1] != values or not 0 <= body - sum(buffers[2]) < 64:  # the body: the values, padded
            self._fail(f"has a record batch of {buffers[2][1]} value bytes where {rows} rows take {values}")
        return buffers[2][0]

    def row_offset(self, row: int, rows_per_batch: int, row_bytes: int) -> int:
        return self.first + (row // rows_per_batch) * self.stride + (row % rows_per_batch) * row_bytes


class _LRU:
    """A dict of at most `limit` entries that forgets the least recently used."""

    def __init__(self, limit: int):
        self.limit, self.items = limit, OrderedDict()

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.limit:
            self.items.popitem(last=False)


def _root(buf: bytes) -> int:
    return struct.unpack_from("<I", buf, 0)[0]


def _field(buf: bytes, table: int, index: int) -> int | None:
    """Position of field `index` of the flatbuffer table at `table`, or None when absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    if 4 + 2 * index >= struct.unpack_from("<H", buf, vtable)[0]:
        return None
    offset = struct.unpack_from("<H", buf, vtable + 4 + 2 * index)[0]
    return table + offset if offset else None


def _vector(buf: bytes, field: int) -> tuple[int, int]:
    """(start, length) of the flatbuffer vector a field points at."""
    vector = field + struct.unpack_from("<I", buf, field)[0]
    return vector + 4, struct.unpack_from("<I", buf, vector)[0]


def _table(buf: bytes, field: int) -> int:
    """Position of the table a field (or a vector element) points at."""
    return field + struct.unpack_from("<I", buf, field)[0]


def _elements(buf: bytes, field: int | None) -> list[int]:
    """Positions of the elements (offsets to tables) of the vector a field points at; [] when absent."""
    if field is None:
        return []
    start, count = _vector(buf, field)
    return [start + 4 * i for i in range(count)]


def _scalar(buf: bytes, table: int, index: int, fmt: str):
    """Scalar field `index` of a table; 0 when absent (a flatbuffer leaves defaults out)."""
    field = _field(buf, table, index)
    return 0 if field is None else struct.unpack_from(fmt, buf, field)[0]


class Split:
    """The rows of one split (`train` or `val`) across its shards, indexed 0..len-1.

    A row is read with one ranged read of its own bytes (rows are fixed-size, so their offsets follow from the
    footer), local or S3 alike; a step's rows are fetched with `max_inflight` reads in flight. At most `max_open`
    local files are open at a time (an S3 file holds no descriptor: as many as footers) and `max_footers` parsed
    footers kept (a verified footer is two ints: about 0.5 KB with its cache entry, so the default 131,072, 16x the
    shards of 1 TB of 128 MB shards, costs at most ~60 MB), least recently used dropped first; no row data is
    cached: memory and file descriptors stay bounded however many shards there are. A shard's footer is read once.
    """

    def __init__(self, directory: str, entry: dict, *, rows_per_batch: int, row_len: int, dtype: str, planes: int = 1,
                 max_open: int = 64, max_footers: int = 1 << 17, max_inflight: int = 16):
        self.paths = [storage.join(directory, s["file"]) for s in entry["shards"]]
        self._starts = np.cumsum([0] + [s["rows"] for s in entry["shards"]])
        sources = [s.get("source") for s in entry["shards"]]
        self._shard_sources = None if None in sources else np.array(sources, dtype=np.int32)
        self.rows_per_batch, self.row_len, self.dtype = rows_per_batch, row_len, np.dtype(dtype)
        self.row_bytes = row_len * self.dtype.itemsize
        self.shape = (row_len,) if planes == 1 else (planes, row_len // planes)
        """Shape of one row: its tokens, or for chat data its planes (tokens, example, loss) of seq_len + 1 each."""
        self._files = _LRU(max_footers if storage.is_s3(directory) else max_open)
        self._footers = _LRU(max_footers)
        self._lock = threading.Lock()
        self._opening: dict[int, threading.Lock] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="raylm-read")
        self.bytes_read = 0
        """Bytes fetched from storage (footers included), for benchmarks."""

    def __len__(self) -> int:
        return int(self._starts[-1])

    def row_sources(self) -> np.ndarray | None:
        """The source id of each row 0..len-1 (int32, an index into `PackedDataset.source_names`), from the shards'
        entries alone (a shard holds one source's rows); None for a dataset made before sources were recorded."""
        if self._shard_sources is None:
            return None
        return np.repeat(self._shard_sources, np.diff(self._starts))

    def source_ranges(self) -> dict[int, list[tuple[int, int]]] | None:
        """Each source's rows as [start, stop) ranges (its shards, adjacent ones merged): O(shards), never O(rows).
        None for a dataset made before sources were recorded."""
        if self._shard_sources is None:
            return None
        ranges: dict[int, list[tuple[int, int]]] = {}
        for source, start, stop in zip(self._shard_sources.tolist(), self._starts[:-1].tolist(),
                                       self._starts[1:].tolist()):
            mine = ranges.setdefault(source, [])
            if mine and mine[-1][1] == start:
                mine[-1] = (mine[-1][0], stop)
            elif stop > start:
                mine.append((start, stop))
        return ranges

    def __getitem__(self, i: int) -> np.ndarray:
        """Row `i`, of shape `shape`."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a split of {len(self)} rows")
        return self.rows([i])[0]

    def _shard(self, index: int) -> tuple:
        """(file, footer) of shard `index`: reads arriving together for a shard not yet open wait for one opening."""
        with self._lock:
            found = self._files.get(index), self._footers.get(index)
            if None not in found:
                return found
            opening = self._opening.setdefault(index, threading.Lock())
        with opening:
            with self._lock:
                file, footer = self._files.get(index), self._footers.get(index)
            path = self.paths[index]
            try:
                if file is None:
                    file = self._open(index)
                if footer is None:
                    rows = int(self._starts[index + 1] - self._starts[index])
                    footer = _Footer(file, path, size=file.size(), rows=rows, rows_per_batch=self.rows_per_batch,
                                     row_len=self.row_len, dtype=self.dtype)
            except (OSError, pa.ArrowException, struct.error, IndexError, ValueError) as exc:
                raise DataError(f"cannot open shard {path} ({str(exc).splitlines()[0]}); re-run dataprep") from exc
            with self._lock:
                self.bytes_read += footer.bytes_read if self._footers.get(index) is None else 0
                self._files.put(index, file)  # an evicted file closes when the last read using it lets go
                self._footers.put(index, footer)
                self._opening.pop(index, None)
        return file, footer

    def _open(self, index: int):
        fs, p = storage.filesystem(self.paths[index])
        return fs.open_input_file(p)

    def _read_run(self, shard: int, first: int, count: int) -> np.ndarray:
        """`count` consecutive rows of one record batch of one shard, in one ranged read."""
        file, footer = self._shard(shard)
        data = file.read_at(count * self.row_bytes, footer.row_offset(first, self.rows_per_batch, self.row_bytes))
        if len(data) != count * self.row_bytes:
            raise DataError(f"shard {self.paths[shard]} is cut short; re-run dataprep")
        with self._lock:
            self.bytes_read += len(data)
        return np.frombuffer(data, dtype=self.dtype).reshape(count, self.row_len)

    def rows(self, indices) -> np.ndarray:
        """Stack of the given rows, shape (len(indices), *shape), read with several requests in flight."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"rows out of range for a split of {len(self)} rows")
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), self.row_len), dtype=self.dtype)
        runs = self._runs(indices[order])
        futures = [(lo, hi, self._pool.submit(self._read_run, shard, first, hi - lo)) for lo, hi, shard, first in runs]
        for lo, hi, future in futures:
            out[order[lo:hi]] = future.result()
        return out.reshape(len(indices), *self.shape)

    def _runs(self, sorted_rows: np.ndarray) -> list[tuple[int, int, int, int]]:
        """(lo, hi, shard, first row in shard) of each run of consecutive rows within one record batch."""
        runs = []
        shards = np.searchsorted(self._starts, sorted_rows, side="right") - 1
        local = sorted_rows - self._starts[shards]
        lo = 0
        for i in range(1, len(sorted_rows) + 1):
            if i == len(sorted_rows) or not (shards[i] == shards[lo] and local[i] == local[i - 1] + 1
                                             and local[i] // self.rows_per_batch == local[lo] // self.rows_per_batch):
                runs.append((lo, i, int(shards[lo]), int(local[lo])))
                lo = i
        return runs


@dataclass
class PackedDataset:
    directory: str
    manifest: dict

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.manifest["tokenizer"]["eos_id"]

    @property
    def bos(self) -> bool:
        """Whether each document starts with BOS (dataprep's `--bos`); a dataset made before the choice: no."""
        return bool(self.manifest.get("bos"))

    @property
    def pairs(self) -> bool:
        """Whether the rows hold preference pairs (dataprep's `--format preference`): in each row, examples 2j+1 and
        2j+2 are pair j's chosen and rejected replies. Text and chat data: no."""
        return bool(self.manifest.get("chat", {}).get("pairs", False))

    @property
    def source_names(self) -> list[str]:
        """The name of each source (input) by id, as `Split.row_sources` gives them; [] for a dataset made before
        sources were recorded."""
        return self.manifest.get("source_names", [])

    @property
    def groups(self) -> dict[str, list[int]]:
        """Named groups of sources: none in one dataset (`Datasets` has one per dataset of several sources)."""
        return {}

    @cached_property
    def train(self) -> Split:
        return self._split("train")

    @cached_property
    def val(self) -> Split:
        return self._split("val")

    def _split(self, name: str) -> Split:
        m = self.manifest
        return Split(self.directory, m["splits"][name], rows_per_batch=m["rows_per_batch"], row_len=m["row_len"],
                     dtype=m["dtype"], planes=len(m["chat"]["planes"]) if "chat" in m else 1)

    @property
    def tokenizer_files(self) -> list[str]:
        """The tokenizer's file names (version-2 manifests before chat data name one `file`)."""
        entry = self.manifest["tokenizer"]
        return entry.get("files") or [entry["file"]]

    def tokenizer_bytes(self) -> dict[str, bytes]:
        """The tokenizer's files, as stored beside the shards."""
        return {name: storage.read_bytes(storage.join(self.directory, name)) for name in self.tokenizer_files}

    def tokenizer(self):
        """The dataset's tokenizer (`raylm.tokenizer.Tokenizer`: SentencePiece or Hugging Face)."""
        from raylm.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_bytes(), where=self.directory).with_bos(self.bos)


class Concatenated:
    """Splits of several datasets read as one: row i of part d is row starts[d] + i; sources are numbered across
    the parts (part d's source k is `first_source[d] + k`)."""

    def __init__(self, parts: list[Split], first_source: list[int]):
        self.parts, self.first_source = parts, first_source
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = parts[0].shape

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        part = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), *self.shape), dtype=self.parts[0].dtype)
        for d in np.unique(part):
            mine = part == d
            out[mine] = self.parts[d].rows(indices[mine] - self.starts[d])
        return out

    def _part_sources(self, d: int) -> list[tuple[int, int, int]]:
        """(source id, start, stop) of part d's rows, in the concatenation's numbering: a part without recorded
        sources is one source."""
        ranges = self.parts[d].source_ranges() or {0: [(0, len(self.parts[d]))]}
        start = int(self.starts[d])
        return [(self.first_source[d] + k, start + a, start + b) for k, spans in ranges.items() for a, b in spans]

    def row_sources(self) -> np.ndarray:
        out = np.empty(len(self), dtype=np.int32)
        for d in range(len(self.parts)):
            for source, start, stop in self._part_sources(d):
                out[start:stop] = source
        return out

    def source_ranges(self) -> dict[int, list[tuple[int, int]]]:
        ranges: dict[int, list[tuple[int, int]]] = {}
        for d in range(len(self.parts)):
            for source, start, stop in self._part_sources(d):
                ranges.setdefault(source, []).append((start, stop))
        return ranges


SAME = ("seq_len", "bos")
"""Manifest fields (dataprep options) the datasets trained on together must share, with the tokenizer (so the
rows' dtype) and the kind of rows."""


class Datasets:
    """Several datasets read as one (`--data.path A B C`): the same tokenizer and rows of the same shape, their
    splits concatenated in order, their sources side by side. A dataset with one source (or none recorded) is one
    source named after its directory; a dataset's sources keep their names (a name two datasets share is prefixed
    with its dataset's), and the dataset's name is the group of them (`groups`)."""

    def __init__(self, datasets: list[PackedDataset]):
        self.datasets = datasets
        first = datasets[0]
        for other in datasets[1:]:
            check_same(first, other)
        own = [d.source_names if len(d.source_names) > 1 else [dataset_name(d.directory)] for d in datasets]
        taken = [name for names in own for name in names]
        self.source_names = [name if taken.count(name) == 1 else f"{dataset_name(d.directory)}/{name}"
                             for d, names in zip(datasets, own) for name in names]
        twice = next((name for name in self.source_names if self.source_names.count(name) > 1), None)
        if twice:
            raise DataError(f"two of the datasets {', '.join(d.directory for d in datasets)} give a source the name "
                            f"{twice} (the same dataset twice, or two directories of one name): give each once, "
                            "under a name of its own")
        self.first_source = list(np.cumsum([0] + [len(names) for names in own])[:-1])
        self.groups = {dataset_name(d.directory): list(range(first, first + len(names)))
                       for d, names, first in zip(datasets, own, self.first_source)
                       if len(names) > 1 and dataset_name(d.directory) not in self.source_names}
        """A dataset of several sources by its directory's name: its source ids (a mix may weigh it as a whole)."""
        self.directory = " + ".join(d.directory for d in datasets)
        self.manifest = {**first.manifest, "datasets": [d.manifest for d in datasets]}
        """The first dataset's manifest (tokenizer, seq_len, kind of rows: all share them) with every dataset's."""

    seq_len = property(lambda self: self.datasets[0].seq_len)
    vocab_size = property(lambda self: self.datasets[0].vocab_size)
    eos_id = property(lambda self: self.datasets[0].eos_id)
    bos = property(lambda self: self.datasets[0].bos)
    pairs = property(lambda self: self.datasets[0].pairs)
    tokenizer_files = property(lambda self: self.datasets[0].tokenizer_files)

    def tokenizer_bytes(self) -> dict[str, bytes]:
        return self.datasets[0].tokenizer_bytes()

    def tokenizer(self):
        return self.datasets[0].tokenizer()

    @cached_property
    def train(self) -> Concatenated:
        return Concatenated([d.train for d in self.datasets], [int(s) for s in self.first_source])

    @cached_property
    def val(self) -> Concatenated:
        return Concatenated([d.val for d in self.datasets], [int(s) for s in self.first_source])


def dataset_name(directory: str) -> str:
    """A dataset's name: its directory's last component."""
    return directory.rstrip("/").rsplit("/", 1)[-1]


def check_same(a: PackedDataset, b: PackedDataset) -> None:
    """Refuse, in one line naming both, datasets that cannot be trained on together."""
    if a.manifest["tokenizer"]["sha256"] != b.manifest["tokenizer"]["sha256"]:
        raise DataError(f"datasets {a.directory} and {b.directory} were made with different tokenizers: prepare "
                        f"{b.directory} again with --tokenizer {a.directory}")
    for field_name in SAME:
        if a.manifest.get(field_name) != b.manifest.get(field_name):
            raise DataError(f"datasets {a.directory} and {b.directory} differ in {field_name} "
                            f"({a.manifest.get(field_name)} vs {b.manifest.get(field_name)}): prepare them with the "
                            f"same --{field_name.replace('_', '-')}")
    if a.manifest.get("chat") != b.manifest.get("chat"):
        raise DataError(f"datasets {a.directory} and {b.directory} hold different kinds of rows (text, chat or "
                        "preference pairs): train on one kind at a time")


def open_datasets(directories: list[str]) -> PackedDataset | Datasets:
    """The dataset at the one directory given, or several read as one (`Datasets`)."""
    opened = [open_dataset(d) for d in directories]
    return opened[0] if len(opened) == 1 else Datasets(opened)


def open_dataset(directory: str) -> PackedDataset:
    """Open the finished dataset at `directory` (local or s3://)."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(
            f"{directory} is not a finished raylm dataset (no {MANIFEST}); make one with "
            f"`python -m dataprep --input CORPUS --output {directory}` (or `python -m dataprep` for the demo's data/stdlib)"
        )
    return PackedDataset(directory, manifest)
