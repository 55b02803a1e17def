"""The process group every job runs in (Ray Train's, torchrun's, or a one-process group of its own), the model
built sharded over it, and the one pattern every collective decision uses: rank 0 decides, every rank acts on the
same answer or raises the same error."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from raylm.errors import RaylmError
from raylm.ray_session import free_port
from trainer.model.transformer import Transformer
from trainer.parallelize import parallelize

T = TypeVar("T")


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def init_distributed(device_name: str) -> Dist:
    """Join the process group set up by Ray Train or torchrun, or make a one-process group (FSDP2 needs a mesh)."""
    device = pick_device(device_name)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:  # torchrun
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def shard_on_meta(cfg, d: Dist, parallel) -> nn.Module:
    """The model built on the meta device with AC/compile/FSDP2 applied over all ranks: nothing allocated yet."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return parallelize(model, mesh=init_device_mesh(d.device.type, (d.world,)), parallel=parallel)


def decided_on_rank0(decide: Callable[[], T], *, rank: int, group=None) -> T:
    """decide() run on rank 0 only (one storage request, not one per rank; one answer where a live run could change
    between two ranks' looks), its result or its user error (RaylmError) given to every rank of `group`: they go on
    or raise together (a rank left waiting in a collective would hang for ever). Any other error is a bug: it keeps
    its traceback on rank 0."""
    outcome: list = [None]
    if rank == 0:
        try:
            outcome = [(decide(),)]
        except RaylmError as exc:
            outcome = [exc]
    dist.broadcast_object_list(outcome, src=0, group=group)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0][0]
