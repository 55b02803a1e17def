"""Decode latency with and without the KV cache at two prompt lengths (demo-sized model, CPU, greedy).

    python -m benchmarks.generate [--config configs/demo.toml] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from raylm.config import load_config
from trainer.model.generation import generate
from trainer.model.transformer import Transformer
from trainer.size import SizeConfig


def seconds(model, prompt: list[int], new_tokens: int, use_cache: bool, repeats: int = 3) -> float:
    """Fastest of `repeats` runs (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(model, prompt, new_tokens, use_cache=use_cache)
        times.append(time.perf_counter() - t0)
    return min(times)


def ms_per_token(model, prompt_len: int, new_tokens: int, use_cache: bool) -> float:
    """Decode time per new token, the prompt's prefill excluded (difference of a long and a 1-token run)."""
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    seconds(model, prompt, 2, use_cache)  # warm-up
    decode = seconds(model, prompt, new_tokens + 1, use_cache) - seconds(model, prompt, 1, use_cache)
    return 1000 * decode / new_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    overrides = ["--model.vocab_size=8000", "--model.max_seq_len=1024"]
    cfg = load_config(SizeConfig, args.config, overrides, partial=True).model
    model = Transformer(cfg)
    model.init_weights(0)
    model.eval()
    print(f"{args.config}: {cfg.num_params() / 1e6:.1f}M params, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} new tokens, decode ms/token (prefill excluded)")
    rows = {n: (ms_per_token(model, n, args.new_tokens, True), ms_per_token(model, n, args.new_tokens, False))
            for n in (32, 512)}
    for n, (cached, full) in rows.items():
        print(f"  prompt {n:4d}: KV cache {cached:7.2f} ms/token   no cache {full:8.2f} ms/token"
              f"   ({full / cached:.1f}x)")
    print(f"  prompt 512 vs 32: KV cache {rows[512][0] / rows[32][0]:.2f}x, no cache {rows[512][1] / rows[32][1]:.2f}x")


if __name__ == "__main__":
    main()
