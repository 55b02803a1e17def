"""What document masking costs: a training step (forward + backward) of rows of several documents with attention
kept inside each (model.doc_mask: SDPA with a dense (T, T) mask on CPU) against plain causal attention (SDPA's
causal kernel), side by side in one process.

    python -m benchmarks.doc_mask [--config configs/demo.toml] [--seq-len 512] [--batch 8] [--doc-len 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from raylm.config import load_config
from trainer.model.transformer import Transformer
from trainer.size import SizeConfig


def step_seconds(model: Transformer, tokens: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of a forward and backward of the rows (after one warm-up)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        logits, _ = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--doc-len", type=int, default=100, help="tokens per document (an EOS ends each)")
    args = ap.parse_args()
    cfg = load_config(SizeConfig, args.config, ["--model.vocab_size=8000", f"--model.max_seq_len={args.seq_len}"],
                      partial=True).model
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(3, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g, device="cpu")
    tokens[:, args.doc_len::args.doc_len] = cfg.eos_id
    seconds = {}
    for doc_mask in (False, True):
        model = Transformer(dataclasses.replace(cfg, doc_mask=doc_mask))
        model.init_weights(0)
        seconds[doc_mask] = step_seconds(model, tokens)
    print(f"{args.config}: {cfg.num_params() / 1e6:.1f}M params, {args.batch} rows of {args.seq_len} tokens, a document "
          f"every {args.doc_len}, {torch.get_num_threads()} threads, forward + backward")
    print(f"  causal {seconds[False] * 1000:.0f} ms, document-masked {seconds[True] * 1000:.0f} ms: "
          f"{seconds[True] / seconds[False]:.2f}x")


if __name__ == "__main__":
    main()
