"""Writing one shard of the dataset format: an Arrow IPC file (random-access, uncompressed so it can be
memory-mapped) of fixed-size token rows, written a record batch at a time under an attempt name of its own
(`storage.temporary_name`) and given its final name only by `publish`; its sha256 is computed on the bytes as
written. Packing rows (dataprep) and test fixtures both write through it, so the reader (`raylm.dataset`) has one
writer to agree with.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow as pa

from raylm import storage
from raylm.dataset import shard_schema


class _HashingSink:
    """A writable file that hashes and counts what passes through it to the real output stream."""

    def __init__(self, raw):
        self.raw, self.sha, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class ShardWriter:
    """One Arrow IPC file (random-access format, uncompressed so it can be memory-mapped), written batch by batch."""

    def __init__(self, out_dir: str, name: str, dtype: np.dtype, row_len: int):
        self.name, self.rows, self.row_len = name, 0, row_len
        self.schema = shard_schema(dtype, row_len)
        path = storage.join(out_dir, name)
        self._fs, self._path = storage.filesystem(path)
        self._tmp = storage.temporary_name(self._path)
        self._fs.create_dir(posixpath.dirname(self._path), recursive=True)
        self._raw = self._fs.open_output_stream(self._tmp, compression=None)
        self._sink = _HashingSink(self._raw)
        self._file = pa.PythonFile(self._sink, mode="w")
        self._writer = pa.ipc.new_file(self._file, self.schema)

    def write(self, rows: np.ndarray) -> None:
        """Append one record batch of rows (shape (n, row_len))."""
        flat = pa.array(rows.reshape(-1))
        self._writer.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(flat, self.row_len)],
                                                 schema=self.schema))
        self.rows += len(rows)

    def discard(self) -> None:
        """Give up the file, open or finished but not published: its attempt is deleted (on S3 the stream can only be
        completed, then deleted)."""
        self._raw.close()
        self._fs.delete_file(self._tmp)

    def close(self) -> dict:
        """Finish and publish the file; its manifest entry."""
        entry = self.finish()
        self.publish()
        return entry

    def finish(self) -> dict:
        """Finish the file under its attempt name and return its manifest entry."""
        self._writer.close()
        self._file.close()
        self._raw.close()
        return {"file": self.name, "rows": self.rows, "bytes": self._sink.size, "sha256": self._sink.sha.hexdigest()}

    def publish(self) -> None:
        """Give the finished file its final name."""
        self._fs.move(self._tmp, self._path)
