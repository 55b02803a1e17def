"""Filling a raylm model from a Hugging Face folder (local or s3://) through the one reader, each rank reading only
the rows it keeps.

An FSDP2 shard of a parameter is a run of rows of dim 0, or for stacked experts sharded on dim 1
(`trainer/parallelize.py`) one run per expert; the parameter's rows are the concatenation of its `hf_blocks`, so a
rank reads, per Hugging Face tensor its runs touch, one ranged read: the experts it owns when they are sharded on
dim 0, the rows [a, b) of every expert's (2H, D) w1 ‖ w3 or (D, H) w2 when they are sharded on dim 1. A plain
(unsharded) model is one run of everything: `import_folder` reads a whole folder that way.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from raylm.errors import DataError
from trainer.hf.config import model_config_from_hf, read_config
from trainer.hf.names import hf_blocks
from trainer.hf.safetensors import READS_IN_FLIGHT, BytesRead, SafetensorsFolder
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer
from trainer.parallelize import plain_name

IGNORED = re.compile(r"^lm_head\.weight$|\.rotary_emb\.inv_freq$")
"""Tensors a folder may hold beyond its model's parameters: the LM head of a tied checkpoint that stores the shared
tensor twice, and the RoPE frequencies older Llama checkpoints saved (raylm computes its own)."""


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


def check_tensors(st: SafetensorsFolder, params: list[tuple[str, torch.Tensor]]) -> None:
    """A DataError unless the folder holds every tensor the parameters need, of their shapes, and no tensor they do
    not: a model missing from its config.json (more layers or experts in the files than it says) would otherwise
    load without a word and compute another function."""
    wanted = set()
    for name, param in params:
        for block, block_shape in hf_blocks(name, tuple(param.shape)):
            st.entry(block, block_shape)
            wanted.add(block)
    extra = sorted(name for name in st.tensors if name not in wanted and not IGNORED.search(name))
    if extra:
        raise DataError(f"{st.folder} holds {len(extra)} tensors a model of its config.json has no place for (first: "
                        f"{extra[0]}); only Llama and Mixtral checkpoints can be loaded")


def load_hf_weights(model: nn.Module, folder: str) -> BytesRead:
    """Fill every parameter of a (sharded) raylm model with this rank's rows of the Hugging Face folder's weights,
    each rank reading only those rows' bytes; returns the bytes read. A missing tensor, a shape mismatch or a tensor
    no parameter takes is a DataError naming it and the folder, raised on every rank alike: every tensor is checked
    before any row is read."""
    params = [(plain_name(name), param) for name, param in model.named_parameters()]
    with SafetensorsFolder(folder) as st:
        check_tensors(st, params)
        with ThreadPoolExecutor(READS_IN_FLIGHT) as pool:
            for future in [pool.submit(fill, st, name, param) for name, param in params]:
                future.result()
        return st.read


def import_folder(folder: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, fp32 raylm state dict) of a Hugging Face Llama/Mixtral folder (local or s3://): the model its
    config.json describes, filled by `load_hf_weights`."""
    cfg = model_config_from_hf(read_config(folder), folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_hf_weights(model.to_empty(device="cpu"), folder)
    return cfg, model.state_dict()
