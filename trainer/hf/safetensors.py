"""Filling an FSDP2-sharded model from a Hugging Face folder's safetensors: each rank reads only what it keeps.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and
data_offsets into the bytes that follow) and the tensors, row-major. The rows [a, b) of a tensor's dim 0, which is
what an FSDP2 shard holds, are therefore one byte range: a rank reads each file's header (one ranged read, sized from
the index's tensor names), then one ranged read per tensor it has rows of, through `raylm.storage`, so a local folder
and an s3:// one are the same code. Names map as in `trainer/hf.py`; a stacked expert weight is read from the
per-expert tensors: those of the experts this rank owns when it is sharded on dim 0; when it is sharded on dim 1
(`trainer/parallelize.py`), the rows [a, b) of every expert's (2H, D) w1 ‖ w3 or (D, H) w2, one ranged read from
each of w1, w3 and w2 that the rows fall in.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from raylm import storage
from raylm.errors import DataError, StorageError
from trainer.hf.config import _LAYER, _RAYLM_LAYER, _TOP
from trainer.parallelize import plain_name

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


def hf_blocks(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The Hugging Face tensors (name, shape) whose concatenation along dim 0 is raylm parameter `name` with its
    leading dims merged: a stacked (E, 2H, D) experts_w13 is w1 then w3 of expert 0, of expert 1, …; (E, D, H)
    experts_w2 is each expert's w2; any other parameter is one tensor of its own shape."""
    if name in _TOP:
        return [(_TOP[name], shape)]
    layer, rest = _RAYLM_LAYER.match(name).groups()
    experts = f"model.layers.{layer}.block_sparse_moe.experts"
    if rest == "feed_forward.experts_w13":
        return [(f"{experts}.{e}.{w}.weight", (shape[1] // 2, shape[2])) for e in range(shape[0]) for w in ("w1", "w3")]
    if rest == "feed_forward.experts_w2":
        return [(f"{experts}.{e}.w2.weight", shape[1:]) for e in range(shape[0])]
    return [(f"model.layers.{layer}.{_LAYER[rest]}", shape)]


def local_runs(param: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(this rank's part of `param`, the runs [start, stop) of merged rows it holds, in its order). Merged rows are
    `param` viewed as (rows, last dim), a 1-D one as (size, 1). FSDP2 shards dim 0 (one run: the rows [a, b) of dim
    0, unevenly if need be) or, for stacked experts, dim 1 (one run per expert: its rows [a, b) of dim 1)."""
    dims = tuple(param.shape) if param.dim() == 1 else tuple(param.shape[:-1])
    if not isinstance(param, DTensor):
        return param.data, [(0, math.prod(dims))]
    if len(param.placements) != 1 or not param.placements[0].is_shard() or param.placements[0].dim >= len(dims):
        raise ValueError(f"expected a parameter sharded on one dim (not its last) of a 1-D mesh, got "
                         f"{param.placements}")
    d = param.placements[0].dim
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    inner = math.prod(dims[d + 1:])  # merged rows per index of dim d
    a, b = offset[d] * inner, (offset[d] + local_shape[d]) * inner
    return param.to_local(), [(o * dims[d] * inner + a, o * dims[d] * inner + b) for o in range(math.prod(dims[:d]))]


@torch.no_grad()  # grad mode is per thread: this runs in a pool
def fill(st: SafetensorsFolder, name: str, param: torch.Tensor) -> None:
    """Copy this rank's rows of `param` from the folder, cast to the parameter's dtype; reads only those rows, one
    ranged read per Hugging Face tensor each run of them touches."""
    local, runs = local_runs(param)
    shape = tuple(param.shape)
    width = shape[-1] if len(shape) > 1 else 1
    flat = local.view(-1, width)
    blocks = hf_blocks(name, shape)
    at = 0  # the local row the run starts at
    for lo, hi in runs:
        offset = 0
        for block, block_shape in blocks:
            rows = math.prod(block_shape) // width
            start, stop = max(lo, offset), min(hi, offset + rows)
            if start < stop:
                part = st.rows(block, block_shape, start - offset, stop - offset)
                flat[at + start - lo:at + stop - lo].copy_(part.reshape(-1, width))
            offset += rows
        at += hi - lo


def load_hf_weights(model: nn.Module, folder: str) -> BytesRead:
    """Fill every parameter of a (sharded) raylm model with this rank's rows of the Hugging Face folder's weights,
    each rank reading only those rows' bytes; returns the bytes read. A missing tensor or a shape mismatch is a
    DataError naming it and the folder, raised on every rank alike: every tensor is checked before any row is read."""
    params = [(plain_name(name), param) for name, param in model.named_parameters()]
    with SafetensorsFolder(folder) as st:
        for name, param in params:
            for block, block_shape in hf_blocks(name, tuple(param.shape)):
                st.entry(block, block_shape)
        with ThreadPoolExecutor(READS_IN_FLIGHT) as pool:
            for future in [pool.submit(fill, st, name, param) for name, param in params]:
                future.result()
        return st.read
