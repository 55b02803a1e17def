"""Reading a finished dataset: `open_dataset(DIR)` → rows of `train`/`val` as numpy arrays.

A directory is a dataset only if its `manifest.json` exists (it is written last). Local shards are memory-mapped;
S3 shards are read one record batch (~1 MB) at a time with ranged GETs, the most recent batch kept per shard.
"""

from __future__ import annotations

import bisect
import json
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


class _Shard:
    """One Arrow IPC shard; rows come from memory-mapped (local) or ranged-read (S3) record batches."""

    def __init__(self, path: str, rows_per_batch: int):
        self.path, self.rows_per_batch = path, rows_per_batch
        self._reader: pa.ipc.RecordBatchFileReader | None = None
        self._cached: tuple[int, np.ndarray] | None = None

    def _open(self) -> pa.ipc.RecordBatchFileReader:
        if self._reader is None:
            fs, p = storage.filesystem(self.path)
            try:
                source = fs.open_input_file(p) if storage.is_s3(self.path) else pa.memory_map(p)
                self._reader = pa.ipc.open_file(source)
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"cannot open shard {self.path} ({str(exc).splitlines()[0]}); re-run dataprep") from None
        return self._reader

    def _batch(self, index: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != index:
            column = self._open().get_batch(index).column(0)
            flat = column.values.to_numpy(zero_copy_only=True)
            self._cached = (index, flat.reshape(len(column), column.type.list_size))
        return self._cached[1]

    def row(self, i: int) -> np.ndarray:
        return self._batch(i // self.rows_per_batch)[i % self.rows_per_batch]


class Split:
    """The rows of one split (`train` or `val`) across its shards, indexed 0..len-1."""

    def __init__(self, directory: str, entry: dict, rows_per_batch: int):
        self._shards = [_Shard(storage.join(directory, s["file"]), rows_per_batch) for s in entry["shards"]]
        self._starts = [int(n) for n in np.cumsum([0] + [s["rows"] for s in entry["shards"]])]

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> np.ndarray:
        """Row `i`: `row_len` token ids (a read-only view when memory-mapped)."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a split of {len(self)} rows")
        s = bisect.bisect_right(self._starts, i) - 1
        return self._shards[s].row(i - self._starts[s])

    def rows(self, indices) -> np.ndarray:
        """Stack of the given rows, shape (len(indices), row_len)."""
        return np.stack([self[int(i)] for i in indices])


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

    @cached_property
    def train(self) -> Split:
        return Split(self.directory, self.manifest["splits"]["train"], self.manifest["rows_per_batch"])

    @cached_property
    def val(self) -> Split:
        return Split(self.directory, self.manifest["splits"]["val"], self.manifest["rows_per_batch"])

    def tokenizer(self):
        """The dataset's SentencePiece processor (loaded from `tokenizer.model`)."""
        from dataprep.tokenizer import load_tokenizer

        path = storage.join(self.directory, self.manifest["tokenizer"]["file"])
        return load_tokenizer(storage.read_bytes(path), where=path)


def open_dataset(directory: str) -> PackedDataset:
    """Open the finished dataset at `directory` (local or s3://)."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(
            f"{directory} is not a finished raylm dataset (no {MANIFEST}); make one with "
            f"`python -m dataprep --input CORPUS --output {directory}` (or `python -m dataprep` for the demo's data/stdlib)"
        )
    return PackedDataset(directory, manifest)
