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


class _Footer:
    """Where the token values of each record batch of an Arrow IPC shard start, parsed from the file's footer (a
    flatbuffer) by hand: pyarrow reads only whole record batches (~1 MB), and a random row needs just its bytes.
    Kept as one int64 per batch, so a rank can hold the footers of thousands of shards."""

    def __init__(self, file, path: str, *, size: int, batches: int):
        want = min(size, 24 * batches + 4096)  # a Block is 24 bytes; the schema and the rest fit in 4 KB
        tail = file.read_at(want, size - want)
        self.bytes_read = len(tail)
        if len(tail) < 10 or tail[-6:] != b"ARROW1":
            raise DataError(f"shard {path} is not an Arrow IPC file (cut short?); re-run dataprep")
        length = struct.unpack_from("<i", tail, len(tail) - 10)[0]
        if length + 10 > len(tail):
            tail = file.read_at(length + 10, size - length - 10)
            self.bytes_read += len(tail)
        footer = tail[len(tail) - 10 - length: len(tail) - 10]
        start, count = _vector(footer, _field(footer, _root(footer), 3))  # Footer.recordBatches: [Block]
        blocks = np.frombuffer(footer, dtype=np.dtype([("offset", "<i8"), ("meta", "<i4"), ("pad", "<i4"),
                                                       ("body", "<i8")]), count=count, offset=start)
        values_at = self._values_offset(file, path, int(blocks["offset"][0]), int(blocks["meta"][0]))
        self.starts = blocks["offset"] + blocks["meta"] + values_at
        """File offset of each batch's first token value."""

    def _values_offset(self, file, path: str, offset: int, meta_len: int) -> int:
        """Offset of the token values within a batch body, read from the first batch's message (raylm's writer
        writes every batch alike: no nulls, no compression, so the buffers are [list validity, values validity,
        values], the validity ones empty)."""
        meta = file.read_at(meta_len, offset)
        self.bytes_read += len(meta)
        message = meta[8:] if meta[:4] == b"\xff\xff\xff\xff" else meta[4:]  # continuation marker, then length
        header = _field(message, _root(message), 2)  # Message.header: the RecordBatch table
        batch = header + struct.unpack_from("<I", message, header)[0]
        if _field(message, batch, 3) is not None:  # RecordBatch.compression
            raise DataError(f"shard {path} is compressed; raylm reads uncompressed shards: re-run dataprep")
        start, count = _vector(message, _field(message, batch, 2))  # RecordBatch.buffers: [Buffer]
        buffers = [struct.unpack_from("<qq", message, start + 16 * i) for i in range(count)]
        if len(buffers) != 3 or buffers[0][1] or buffers[1][1]:
            raise DataError(f"shard {path} has nulls or an unexpected layout; re-run dataprep")
        return buffers[2][0]

    def row_offset(self, row: int, rows_per_batch: int, row_bytes: int) -> int:
        return int(self.starts[row // rows_per_batch]) + (row % rows_per_batch) * row_bytes


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


class Split:
    """The rows of one split (`train` or `val`) across its shards, indexed 0..len-1.

    A row is read with one ranged read of its own bytes (rows are fixed-size, so their offsets follow from the
    footer), local or S3 alike; a step's rows are fetched with `max_inflight` reads in flight. At most `max_open`
    local files are open at a time (an S3 file holds no descriptor: as many as footers) and `max_footers` parsed
    footers kept (8 bytes per record batch), least recently used dropped first; no row data is cached: memory and
    file descriptors stay bounded however many shards there are. A shard's footer is read once.
    """

    def __init__(self, directory: str, entry: dict, *, rows_per_batch: int, row_len: int, dtype: str, planes: int = 1,
                 max_open: int = 64, max_footers: int = 8192, max_inflight: int = 16):
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
                    footer = _Footer(file, path, size=file.size(), batches=-(-rows // self.rows_per_batch))
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
    def source_names(self) -> list[str]:
        """The name of each source (input) by id, as `Split.row_sources` gives them; [] for a dataset made before
        sources were recorded."""
        return self.manifest.get("source_names", [])

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

    def tokenizer(self):
        """The dataset's tokenizer (`dataprep.tokenizer.Tokenizer`: SentencePiece or Hugging Face)."""
        from dataprep.tokenizer import load_tokenizer

        files = {name: storage.read_bytes(storage.join(self.directory, name)) for name in self.tokenizer_files}
        return load_tokenizer(files, where=self.directory).with_bos(self.bos)


def open_dataset(directory: str) -> PackedDataset:
    """Open the finished dataset at `directory` (local or s3://)."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(
            f"{directory} is not a finished raylm dataset (no {MANIFEST}); make one with "
            f"`python -m dataprep --input CORPUS --output {directory}` (or `python -m dataprep` for the demo's data/stdlib)"
        )
    return PackedDataset(directory, manifest)
