"""MoE expert-loop cost as the number of experts and top-k vary: FLOPs counted by torch, and measured time.

    python -m benchmarks.moe
Expected: cost follows top_k (tokens routed), not n_experts (only the router grows with n_experts).
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.model import ModelConfig, MoE


def measure(n_experts: int, top_k: int, tokens: int = 4096, dim: int = 256, hidden: int = 512) -> tuple[float, float]:
    cfg = ModelConfig(dim=dim, n_heads=4, n_layers=1, ffn_hidden=hidden, n_experts=n_experts, top_k=top_k)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        moe(x)[0].sum().backward()
    t0 = time.perf_counter()
    for _ in range(3):
        moe(x)[0].sum().backward()
    return counter.get_total_flops() / 1e9, 1000 * (time.perf_counter() - t0) / 3


def main() -> None:
    print("4096 tokens, dim 256, expert hidden 512; forward + backward of one MoE layer")
    base = None
    for n_experts, top_k in [(4, 1), (16, 1), (64, 1), (4, 2), (16, 2), (64, 2)]:
        gflop, ms = measure(n_experts, top_k)
        base = base or (gflop, ms)
        print(f"  experts {n_experts:3d} top-{top_k}: {gflop:6.2f} GFLOP ({gflop / base[0]:.2f}x)  {ms:7.1f} ms ({ms / base[1]:.2f}x)")


if __name__ == "__main__":
    main()
