"""MoE layer cost as the number of experts and top-k vary: FLOPs counted by torch, and measured time.

    python -m benchmarks.moe
Expected: FLOPs follow top_k (tokens routed), not n_experts (only the router, 2·N·D·E, grows with n_experts). Time
follows FLOPs until the expert weights themselves dominate: at 64 experts the layer holds 25M parameters whose weight
gradients must be written whatever the token count, and each expert's group is small (N·k/E rows).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.model.config import ModelConfig
from trainer.model.transformer import MoE

TOKENS, DIM, HIDDEN = 4096, 256, 512


def fwd_bwd(moe: MoE, x: torch.Tensor) -> None:
    out, aux = moe(x)
    (out.sum() + aux).backward()


def measure(n_experts: int, top_k: int, repeats: int = 7) -> tuple[float, float]:
    """(GFLOP, median ms) of one forward + backward of an MoE layer over TOKENS tokens."""
    cfg = ModelConfig(dim=DIM, n_heads=4, n_layers=1, ffn_hidden=HIDDEN, n_experts=n_experts, top_k=top_k)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, TOKENS, DIM, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        fwd_bwd(moe, x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd_bwd(moe, x)
        times.append(time.perf_counter() - t0)
    return counter.get_total_flops() / 1e9, 1000 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    print(f"{TOKENS} tokens, dim {DIM}, expert hidden {HIDDEN}; forward + backward of one MoE layer, "
          f"{torch.get_num_threads()} threads, median of 7")
    base = None
    for top_k in (1, 2, 4):
        for n_experts in (4, 16, 64):
            gflop, ms = measure(n_experts, top_k)
            base = base or (gflop, ms)
            print(f"  top-{top_k} of {n_experts:3d} experts: {gflop:6.2f} GFLOP ({gflop / base[0]:.2f}x)  "
                  f"{ms:7.1f} ms ({ms / base[1]:.2f}x)")


if __name__ == "__main__":
    main()
