"""The one safetensors reader: a Hugging Face folder's tensors, local or s3://, read by ranges of rows.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and
data_offsets into the bytes that follow) and the tensors, row-major. The rows [a, b) of a tensor's dim 0 are
therefore one byte range: the reader reads each file's header (one ranged read, sized from the index's tensor
names), then one ranged read per run of rows asked for, through `raylm.storage`, so a local folder and an s3:// one
are the same code. It knows nothing of raylm's names: `trainer.hf.load` asks it for the tensors a model needs.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from raylm import storage
from raylm.errors import DataError, StorageError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
HEADER_BYTES_PER_TENSOR = 96
"""A header entry is its name plus ~70 bytes (dtype, shape, offsets): the first read of a file listed in an index is
sized by this, so it nearly always holds the whole header (a longer one costs a second read)."""
HEADER_BYTES_UNINDEXED = 16 << 10
"""The first read of a lone model.safetensors, whose tensor names are unknown beforehand."""
READS_IN_FLIGHT = 8


@dataclass(frozen=True)
class Entry:
    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Offset of the tensor's first byte in the file."""
    nbytes: int


@dataclass
class BytesRead:
    headers: int = 0
    """Bytes of the first read(s) of each file, the header and whatever followed it in that read."""
    tensors: int = 0
    """Bytes of the tensors' rows."""

    @property
    def total(self) -> int:
        return self.headers + self.tensors


class SafetensorsFolder:
    """The tensors of a Hugging Face folder (model.safetensors, or the shards its index lists), read by ranges of
    rows. Opens every file and reads its header on construction; `close()` (or `with`) closes them."""

    def __init__(self, folder: str):
        self.folder = folder
        self.read = BytesRead()
        self._lock = threading.Lock()
        self._files: dict[str, object] = {}
        self.tensors: dict[str, Entry] = {}
        listed = self._listing()
        try:
            with ThreadPoolExecutor(READS_IN_FLIGHT) as pool:
                for entries in pool.map(self._header, listed, listed.values()):
                    self.tensors.update(entries)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _listing(self) -> dict[str, list[str]]:
        """File name -> the tensor names the index puts in it ([] for a lone model.safetensors)."""
        index = storage.join(self.folder, INDEX)
        if storage.exists(index):
            try:
                weight_map = json.loads(storage.read_bytes(index))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{index} is not a safetensors index (no weight_map)") from None
            files: dict[str, list[str]] = {}
            for tensor, file in weight_map.items():
                files.setdefault(file, []).append(tensor)
            return files
        if storage.exists(storage.join(self.folder, SINGLE)):
            return {SINGLE: []}
        raise DataError(f"{self.folder} has no {SINGLE} (or {INDEX}); only safetensors checkpoints can be loaded")

    def _header(self, file: str, names: list[str]) -> dict[str, Entry]:
        path = storage.join(self.folder, file)
        fs, inner = storage.filesystem(path)
        try:
            handle = self._files[path] = fs.open_input_file(inner)
            size = handle.size()
            want = HEADER_BYTES_UNINDEXED if not names else 1024 + sum(len(n) + HEADER_BYTES_PER_TENSOR for n in names)
            head = handle.read_at(min(size, 8 + want), 0)
            length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else size
            if 8 + length > size:
                raise DataError(f"{path} is not a safetensors file (its header runs past its {size:,} bytes)")
            if 8 + length > len(head):
                head += handle.read_at(8 + length - len(head), len(head))
        except FileNotFoundError:
            raise DataError(f"{path} is missing (the folder's {INDEX} lists it)") from None
        except OSError as exc:
            raise StorageError(storage.describe_os_error(exc, path)) from None
        self._count("headers", len(head))
        try:
            header = json.loads(head[8:8 + length])
            header.pop("__metadata__", None)
            return {name: Entry(path, e["dtype"], tuple(e["shape"]), 8 + length + e["data_offsets"][0],
                                e["data_offsets"][1] - e["data_offsets"][0]) for name, e in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"{path} is not a safetensors file (unreadable header)") from None

    def _count(self, kind: str, n: int) -> None:
        with self._lock:
            setattr(self.read, kind, getattr(self.read, kind) + n)

    def entry(self, name: str, shape: tuple[int, ...]) -> Entry:
        """The tensor `name`, checked to have `shape` and a dtype raylm reads; a DataError naming it otherwise."""
        entry = self.tensors.get(name)
        if entry is None:
            raise DataError(f"{self.folder} has no tensor {name}, which a model of its config.json needs")
        if entry.shape != tuple(shape):
            raise DataError(f"{self.folder}: tensor {name} has shape {list(entry.shape)}, but its config.json makes "
                            f"it {list(shape)}")
        if entry.dtype not in DTYPES:
            raise DataError(f"{self.folder}: tensor {name} is {entry.dtype}; raylm loads {', '.join(DTYPES)} weights")
        if entry.nbytes != math.prod(shape) * DTYPES[entry.dtype].itemsize:
            raise DataError(f"{entry.path}: tensor {name} spans {entry.nbytes:,} bytes, not what a {entry.dtype} "
                            f"tensor of shape {list(shape)} takes (a damaged file?)")
        return entry

    def rows(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 of tensor `name` (of `shape`), in the file's dtype, with one ranged read."""
        entry = self.entry(name, shape)
        dtype = DTYPES[entry.dtype]
        row = math.prod(shape[1:]) * dtype.itemsize
        try:
            data = self._files[entry.path].read_at((stop - start) * row, entry.start + start * row)
        except OSError as exc:
            raise StorageError(storage.describe_os_error(exc, entry.path)) from None
        self._count("tensors", len(data))
        if len(data) != (stop - start) * row:
            raise DataError(f"{entry.path} is cut short: tensor {name} runs past its end")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(stop - start, *shape[1:])
