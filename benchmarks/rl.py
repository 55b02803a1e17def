"""One GRPO step's parts in one process, side by side (demo-sized model, CPU): rollout tokens per second of one
actor (a prompt's group decoded together through one KV cache, against the same replies decoded one at a time),
the update, and the weight sync (the trainer's sharded write, an actor's load), with each part's share of the step.

    python -m benchmarks.rl [--config configs/demo.toml] [--prompts 8] [--group 8] [--new-tokens 64]

Rewards are left out (they are the user's function); a real run logs every part per step (rollout_s, reward_s,
update_s, sync_s) and several actors generate side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from raylm.config import load_config
from trainer import checkpoint
from trainer.distributed import init_distributed, shard_on_meta
from trainer.model.config import initial_value
from trainer.model.generation import generate, generate_group
from trainer.model.transformer import Transformer
from trainer.optim import OptimConfig, build_optimizer
from trainer.parallelize import ParallelConfig, materialize
from trainer.rl.grpo import GRPO
from trainer.rl.loop import Sample, rollout_batch
from trainer.size import SizeConfig
from trainer.train import train_step


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    cfg = load_config(SizeConfig, args.config, ["--model.vocab_size=8000", "--model.max_seq_len=512"],
                      partial=True).model
    d = init_distributed("cpu")
    actor = Transformer(cfg)
    actor.init_weights(0)
    actor.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (64,), generator=g).tolist() for _ in range(args.prompts)]
    seeds = [list(range(i * args.group, (i + 1) * args.group)) for i in range(args.prompts)]
    generate_group(actor, prompts[0], seeds[0][:2], 2, temperature=1.0)  # warm-up
    groups, rollout_s = timed(lambda: [generate_group(actor, p, s, args.new_tokens, temperature=1.0)
                                       for p, s in zip(prompts, seeds)])
    tokens = sum(len(r) for group in groups for r in group)
    _, single_s = timed(lambda: [generate(actor, prompts[0], args.new_tokens, 1.0,
                                          generator=torch.Generator().manual_seed(j)) for j in range(args.group)])
    single_rate = args.group * args.new_tokens / single_s

    model = shard_on_meta(cfg, d, ParallelConfig())
    materialize(model, device=d.device, initial_value=lambda name, shape: initial_value(name, shape, cfg, 0))
    model.init_buffers()
    optimizer = build_optimizer(model, optim=OptimConfig(lr=1e-6, warmup_steps=0), width_mult=1.0)
    samples = [Sample(tuple(p), r, float(torch.randn((), generator=g)), None) for p, group in zip(prompts, groups)
               for r in group]
    width = max(len(s.prompt) + len(s.reply) for s in samples)
    micro = [rollout_batch(samples[i:i + 8], width=width, device=d.device, reference=False)
             for i in range(0, len(samples), 8)]
    objective = GRPO(clip_eps=0.2, kl_coef=0.0)
    _, update_s = timed(lambda: train_step(model, optimizer, micro, objective=objective, grad_clip=1.0,
                                           aux_weight=0.0, global_batch=len(samples)))
    with tempfile.TemporaryDirectory() as where:
        _, write_s = timed(lambda: checkpoint.write_weights(f"{where}/step-000001", model))
        _, load_s = timed(lambda: checkpoint.read_weights(f"{where}/step-000001", actor.state_dict()))
    sync_s = write_s + load_s
    step_s = rollout_s + update_s + sync_s
    print(f"{args.config}: {cfg.num_params() / 1e6:.1f}M params, {torch.get_num_threads()} threads, {args.prompts} "
          f"prompts x {args.group} samples x {args.new_tokens} new tokens")
    print(f"  rollout: {tokens / rollout_s:,.0f} tokens/s per actor, a group decoded together "
          f"({single_rate:,.0f} tokens/s one reply at a time: {tokens / rollout_s / single_rate:.1f}x)")
    print(f"  one step without rewards: {step_s:.2f} s = rollout {rollout_s:.2f} s ({rollout_s / step_s:.0%}), "
          f"update {update_s:.2f} s ({update_s / step_s:.0%}), weight sync {sync_s:.2f} s ({sync_s / step_s:.0%}: "
          f"write {write_s:.2f} s, load {load_s:.2f} s)")


if __name__ == "__main__":
    main()
