"""Parallelism applied to the plain model from outside: activation checkpointing → compile → FSDP2 per block → root.

The model is built on the meta device, sharded, then materialised: each rank allocates only its shards, and each
parameter's full initial value is computed from (seed, name) and sliced, so weights do not depend on world size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from raylm.errors import ConfigError

AC_MODES = ("none", "full", "selective")
WRAPPER_PREFIX = "_checkpoint_wrapped_module."


@dataclass(kw_only=True)
class ParallelConfig:
    mixed_precision: str = "fp32"
    """'bf16': bf16 parameters and compute with fp32 gradient reduction (the GPU setting); 'fp32': full precision."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward: 'none', 'full' (every block) or 'selective' (every ac_every-th block)."""
    ac_every: int = 2
    """With selective checkpointing: checkpoint one block in this many."""
    compile: bool = False
    """torch.compile each block (the GPU setting; works on CPU too, ~20 s of compile at start)."""
    reshard_after_forward: bool = True
    """Free gathered parameters after forward (ZeRO-3); False keeps them for backward (ZeRO-2, more memory)."""
    unsharded_grad_accumulation: bool = False
    """Accumulate micro-batch gradients unsharded and reduce-scatter once per step: fewer collectives, but every
    rank keeps a full fp32 gradient (4 bytes per parameter, +32 GB per GPU at 8B). Default: reduce-scatter each
    micro-batch and keep only this rank's shard."""

    def __post_init__(self):
        if self.mixed_precision not in ("fp32", "bf16"):
            raise ConfigError(f"parallel.mixed_precision must be 'fp32' or 'bf16', got {self.mixed_precision!r}")
        if self.activation_checkpointing not in AC_MODES:
            raise ConfigError(f"parallel.activation_checkpointing must be one of {', '.join(AC_MODES)}, "
                              f"got {self.activation_checkpointing!r}")
        if self.ac_every < 1:
            raise ConfigError(f"parallel.ac_every must be >= 1, got {self.ac_every}")

    def policy(self) -> MixedPrecisionPolicy:
        if self.mixed_precision == "bf16":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def checkpoints_block(self, index: int) -> bool:
        if self.activation_checkpointing == "full":
            return True
        return self.activation_checkpointing == "selective" and index % self.ac_every == 0


def parallelize(model: nn.Module, *, mesh: DeviceMesh, parallel: ParallelConfig) -> nn.Module:
    """Wrap `model.layers` blocks (AC, compile), then fully_shard each block and the root. Works on meta.

    Gradients are summed across ranks, not averaged (divide factor 1): the loop weights each token's loss by the
    inverse of the step's global token count, which is what makes ranks with unequal shares exact."""
    for index, (name, block) in enumerate(list(model.layers.named_children())):
        if parallel.checkpoints_block(index):
            block = checkpoint_wrapper(block)  # AC before compile, so compile sees the recompute region
            model.layers.register_module(name, block)
        if parallel.compile:
            block.compile()  # in place: keeps state-dict keys (torch.compile(block) would add `_orig_mod.`)
        fully_shard(block, mesh=mesh, mp_policy=parallel.policy(), reshard_after_forward=parallel.reshard_after_forward,
                    shard_placement_fn=functools.partial(shard_placement, world=mesh.size()))
        sum_gradients(block)
    model = fully_shard(model, mesh=mesh, mp_policy=parallel.policy(), reshard_after_forward=parallel.reshard_after_forward)
    sum_gradients(model)
    return model


def shard_placement(param: nn.Parameter, *, world: int) -> Shard:
    """Dim 0, except for a stacked (E, …) MoE expert tensor whose E rows do not split evenly over the W ranks: dim 1
    then, if its rows split evenly (FSDP2 shards any dim but 0 only evenly). FSDP2 gives each rank ⌈size / W⌉ rows
    of the sharded dim (the last ranks fewer or none), so on dim 0 (E = 8 for Mixtral) no rank holds less than a
    whole expert: past 8 ranks the experts stop shrinking and ranks 0-7 hold all of them. Dim 1 (2·hidden or dim
    rows) splits every expert W ways instead, as torchtitan does; where E divides evenly dim 0 is kept, as its
    all-gather needs no re-layout."""
    if param.ndim == 3 and param.shape[0] % world and param.shape[1] % world == 0:
        return Shard(1)
    return Shard(0)


def sum_gradients(module) -> None:
    """Reduce-scatter gradients as a plain sum (gloo has no pre-multiplied sum, and NCCL is zero-copy only for SUM)."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def plain_name(name: str) -> str:
    """A parameter's name in the plain model (no activation-checkpoint wrapper in it)."""
    return name.replace(WRAPPER_PREFIX, "")


@torch.no_grad()
def materialize(model: nn.Module, *, device: torch.device, initial_value: Callable[[str, torch.Size], torch.Tensor]) -> None:
    """Allocate the (sharded) parameters on `device` and fill each with its slice of `initial_value(name, shape)`."""
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        full = initial_value(plain_name(name), param.shape).to(device=device, dtype=param.dtype)
        if isinstance(param, DTensor):
            # every rank computes the same full value, so no data needs to move (src_data_rank=None)
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)
