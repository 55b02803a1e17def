"""Packing documents into fixed-length rows and writing them as Arrow IPC shards.

Rows are `seq_len + 1` tokens so a row gives both inputs and shifted targets. Documents are packed end to end
(each already ends in EOS), with no padding; the trailing partial row of a split is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raylm import storage

BATCH_BYTES = 1 << 20
"""Target size of one record batch: the unit of a ranged read on S3."""


def shard_schema(dtype: np.dtype, row_len: int) -> pa.Schema:
    return pa.schema([pa.field("tokens", pa.list_(pa.from_numpy_dtype(dtype), row_len))])


def rows_per_batch(row_len: int, dtype: np.dtype) -> int:
    return max(1, BATCH_BYTES // (row_len * dtype.itemsize))


def shard_bytes(rows: np.ndarray, per_batch: int) -> bytes:
    """An Arrow IPC file (random-access format, uncompressed so it can be memory-mapped) holding `rows` in record
    batches of `per_batch` rows."""
    n, row_len = rows.shape
    schema = shard_schema(rows.dtype, row_len)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, n, per_batch):
            flat = pa.array(rows[start:start + per_batch].reshape(-1))
            writer.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(flat, row_len)], schema=schema))
    return sink.getvalue().to_pybytes()


@dataclass
class SplitPacker:
    """Accumulates one split's token stream and writes a shard each time enough full rows are buffered."""

    out_dir: str
    split: str
    row_len: int
    rows_per_shard: int
    dtype: np.dtype
    shards: list[dict] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    _pending: list[np.ndarray] = field(default_factory=list)
    _pending_len: int = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        self.tokens += len(tokens)
        self._pending.append(tokens)
        self._pending_len += len(tokens)
        while self._pending_len >= self.rows_per_shard * self.row_len:
            self._write(self.rows_per_shard)

    def finish(self) -> dict:
        """Write the last (smaller) shard, drop the partial row, and return this split's manifest entry."""
        full_rows = self._pending_len // self.row_len
        if full_rows:
            self._write(full_rows)
        rows = sum(s["rows"] for s in self.shards)
        return {
            "shards": self.shards,
            "rows": rows,
            "documents": self.documents,
            "tokens": self.tokens,
            "dropped_tokens": self.tokens - rows * self.row_len,
        }

    def _write(self, n_rows: int) -> None:
        stream = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        take = n_rows * self.row_len
        rows = stream[:take].astype(self.dtype, copy=False).reshape(n_rows, self.row_len)
        self._pending, self._pending_len = [stream[take:]], len(stream) - take
        name = f"{self.split}/shard-{len(self.shards):05d}.arrow"
        data = shard_bytes(rows, rows_per_batch(self.row_len, self.dtype))
        storage.write_bytes(storage.join(self.out_dir, name), data)
        self.shards.append({"file": name, "rows": n_rows, "bytes": len(data)})
