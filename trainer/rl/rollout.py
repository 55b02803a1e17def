"""Rollouts by Ray actors: each holds a full copy of the current policy (and of the reference policy, for the KL
term) and answers whole prompts: a prompt's group of samples is decoded together through raylm's KV cache, sample
j of prompt p at step s drawn by a generator seeded with (seed, s, p, j) alone. Which actor makes a rollout, and
how many actors there are, changes nothing in it.

Weights reach the actors as a sharded DCP copy of the policy the trainer ranks write after each update
(`trainer.checkpoint.write_weights`: each rank its own shards, no rank ever holding the full model); every rollout
call names the version it needs, so an actor that Ray restarts after its process or node died loads it before it
answers, and the calls it lost are retried there (max_restarts / max_task_retries): its prompts are redone, with the
same seeds. The engine is `RolloutWorker.generate_unit`: the one seam where a vLLM engine would go.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from trainer.faults import FaultConfig, inject_rollout_fault
from trainer.model.config import ModelConfig
from trainer.model.generation import generate_group
from trainer.model.transformer import Transformer
from trainer.rl.grpo import target_logps

ROLLOUT_STREAM = 4
"""The seed stream of rollout samples (trainer/rl/prompts.py's prompt order is 3)."""


def sample_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    """The seed of sample `sample` of prompt `prompt` at step `step`: a hash of the four, in [0, 2^63)."""
    state = np.random.SeedSequence([seed, ROLLOUT_STREAM, step, prompt, sample]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


@dataclass(frozen=True)
class Unit:
    """One prompt's work: its token ids, its index in the prompts file and its samples' seeds."""

    prompt: int
    ids: tuple[int, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]
    reference: bool
    """Whether to score the replies under the reference policy (the KL term needs it)."""


@dataclass
class UnitResult:
    replies: list[list[int]]
    ref_logps: list[np.ndarray] | None
    """Each reply token's log-prob under the reference policy (float32), when asked for."""
    process: int
    """The pid of the actor's process that answered: a new one for the same actor means Ray restarted it."""


def empty_model(cfg: ModelConfig, device: torch.device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_buffers()
    return model.eval()


@torch.no_grad()
def reply_logps(model: Transformer, prompt: tuple[int, ...], replies: list[list[int]]) -> list[np.ndarray]:
    """Each reply token's log-prob under `model`, the replies right-padded into one batch (causal attention: the
    padding after a reply changes nothing before it)."""
    device = model.tok_embeddings.weight.device
    longest = max(len(r) for r in replies)
    rows = torch.zeros((len(replies), len(prompt) + longest), dtype=torch.long, device=device)
    for i, reply in enumerate(replies):
        rows[i, :len(prompt) + len(reply)] = torch.tensor([*prompt, *reply], device=device)
    logits, _ = model(rows[:, :-1])
    logp, _ = target_logps(logits, rows[:, 1:])  # as the trainer takes the policy's: the KL compares the two
    start = len(prompt) - 1
    return [logp[i, start:start + len(reply)].cpu().numpy().astype(np.float32) for i, reply in enumerate(replies)]


class RolloutWorker:
    """A rollout actor's state: the policy at the newest version it was told of, and the reference policy."""

    def __init__(self, model: dict, reference: str | None, *, device: str, threads: int, fault: FaultConfig,
                 run_dir: str):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.policy = empty_model(ModelConfig(**model), self.device)
        self.version: int | None = None
        self.reference = None
        if reference:
            from trainer.weights import load_weights

            self.reference = load_weights(reference).model().to(self.device)
        self.fault, self.run_dir = fault, run_dir

    def load(self, policy: str, version: int) -> float:
        """Take the policy weights of `policy` (a `write_weights` copy) unless this version is loaded already;
        returns the seconds it took."""
        t0 = time.perf_counter()
        if version != self.version:
            from trainer.checkpoint import read_weights

            read_weights(policy, self.policy.state_dict())
            self.version = version
        return time.perf_counter() - t0

    def rollout(self, unit: Unit, sampling: Sampling, *, policy: str, version: int, step: int) -> UnitResult:
        self.load(policy, version)
        inject_rollout_fault(self.fault, run_dir=self.run_dir, step=step)
        replies = self.generate_unit(unit, sampling)
        ref = reply_logps(self.reference, unit.ids, replies) if sampling.reference and self.reference else None
        return UnitResult(replies, ref, os.getpid())

    def generate_unit(self, unit: Unit, sampling: Sampling) -> list[list[int]]:
        """The rollout engine: the replies to one prompt, one per seed."""
        return generate_group(self.policy, list(unit.ids), list(unit.seeds), sampling.max_new_tokens,
                              temperature=sampling.temperature, top_p=sampling.top_p, stop_ids=sampling.stop_ids)


class RolloutPool:
    """rl.rollout_workers RolloutWorker actors (made by rank 0 of the trainer group, so they end with it), their
    calls dealt out a prompt at a time."""

    def __init__(self, rl, *, model: dict, reference: str | None, run_dir: str, fault: FaultConfig):
        import ray

        gpu = rl.rollout_gpus > 0
        actor = ray.remote(RolloutWorker).options(
            num_cpus=rl.rollout_cpus, num_gpus=rl.rollout_gpus, max_restarts=rl.rollout_restarts,
            max_task_retries=rl.rollout_restarts, max_concurrency=1)
        self.actors = [actor.remote(model, reference, device="cuda" if gpu else "cpu",
                                    threads=max(1, int(rl.rollout_cpus)), fault=fault, run_dir=run_dir)
                       for _ in range(rl.rollout_workers)]

    def load(self, policy: str, version: int) -> float:
        """Every actor takes the new policy; returns the seconds until the last one has."""
        import ray

        t0 = time.perf_counter()
        ray.get([a.load.remote(policy, version) for a in self.actors])
        return time.perf_counter() - t0

    def run(self, units: list[Unit], sampling: Sampling, *, policy: str, version: int, step: int
            ) -> list[UnitResult]:
        """The results of `units`, in their order, unit i made by actor i mod K."""
        import ray

        refs = [self.actors[i % len(self.actors)].rollout.remote(unit, sampling, policy=policy, version=version,
                                                                 step=step)
                for i, unit in enumerate(units)]
        return ray.get(refs)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
