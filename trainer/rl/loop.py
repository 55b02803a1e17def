"""The RL loop on every trainer rank (a Ray Train worker): rank 0 drives the rollout actors and the reward tasks,
every rank takes its share of the step's samples for the GRPO update, then the new weights go to the actors.

One step s (counted from 1, as it is saved):
  1. rollouts: rank 0 asks the actors for step s's prompts (an EpochOrder over the prompts), group_size samples each, with
     the policy of version s - 1; the reference's log-probs of each reply come with it (once per sample);
  2. rewards: one Ray task per prompt's group, each reply with a deadline; group-relative advantages;
  3. the samples go to every rank (a broadcast); rank r takes micro-batches r, r + W, … of them and runs
     rl.epochs optimizer steps (`trainer.train.train_step` with the GRPO objective: a token mean over the step's
     reply tokens on all ranks, so any W gives the same update);
  4. weight sync: every rank writes its shards of the new policy (`checkpoint.write_weights`), the actors load it;
  5. a checkpoint at checkpoint.every (the step is the cursor: a re-run redoes step s + 1 with the same seeds and
     weights, so the same rollouts).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from raylm import storage
from raylm.tokenizer import load_tokenizer
from trainer import checkpoint
from trainer.checkpoint import Checkpointer
from trainer.data import EpochOrder, rank_micro_batches
from trainer.distributed import decided_on_rank0, init_distributed, shard_on_meta
from trainer.eval.job import find_checkpoint
from trainer.faults import inject_fault
from trainer.metrics import MetricsLog
from trainer.optim import build_optimizer, build_scheduler, set_schedule_step
from trainer.rl.config import RLJob
from trainer.rl.grpo import GRPO, RolloutBatch, group_advantages
from trainer.rl.prompts import PROMPT_STREAM, read_prompts, stop_ids
from trainer.rl.rewards import COUNTED, score_groups
from trainer.rl.rollout import RolloutPool, Sampling, Unit, sample_seed
from trainer.train import TrainingDiverged, train_step

log = logging.getLogger(__name__)

POLICY_DIR = "policy"
"""RUN_DIR/policy/step-NNNNNN: the newest weights the actors load (only the newest is kept)."""


def identity(job: RLJob, cfg) -> dict:
    """What a checkpoint of an RL run shares with any run that continues it."""
    rl = job.rl
    return {**checkpoint.model_identity(cfg), "rl.policy": rl.policy, "rl.prompts": rl.prompts, "rl.seed": rl.seed,
            "rl.prompts_per_step": rl.prompts_per_step, "rl.group_size": rl.group_size}


@dataclasses.dataclass
class Sample:
    prompt: tuple[int, ...]
    reply: list[int]
    advantage: float
    ref_logp: np.ndarray | None


class Rollouts:
    """Rank 0's side of a step: the actors, the prompts and the rewards."""

    def __init__(self, job: RLJob, found, tokenizer):
        self.job, self.tokenizer = job, tokenizer
        rl = job.rl
        room = found.cfg.max_seq_len - rl.max_new_tokens
        self.prompts = read_prompts(rl.prompts, tokenizer, max_prompt_len=room)
        self.order = EpochOrder(len(self.prompts), rl.seed, key=(PROMPT_STREAM,))
        self.eval_prompts = read_prompts(rl.eval_prompts, tokenizer, max_prompt_len=room) if rl.eval_prompts else []
        self.stops = stop_ids(tokenizer)
        self.sampling = Sampling(rl.max_new_tokens, rl.temperature, rl.top_p, self.stops, reference=rl.kl_coef > 0)
        self.pool = RolloutPool(rl, model=dataclasses.asdict(found.cfg), reference=rl.policy if rl.kl_coef > 0
                                else None, run_dir=job.run.dir, fault=job.fault)
        self.processes: dict[int, int] = {}
        self.restarts = 0

    def text(self, reply: list[int]) -> str:
        return self.tokenizer.decode(reply[:-1] if reply and reply[-1] in self.stops else reply)

    def step(self, step: int, *, policy: str, version: int) -> tuple[list[Sample], dict]:
        """Step `step`'s samples (prompt order, then sample order) and what they showed."""
        rl = self.job.rl
        chosen = self.order.rows((step - 1) * rl.prompts_per_step, step * rl.prompts_per_step)
        units = [Unit(int(p), self.prompts[p].ids, tuple(sample_seed(rl.seed, step, int(p), j)
                                                          for j in range(rl.group_size))) for p in chosen]
        t0 = time.perf_counter()
        results = self.pool.run(units, self.sampling, policy=policy, version=version, step=step)
        rollout_s = time.perf_counter() - t0
        for i, result in enumerate(results):  # a new process for an actor: Ray restarted it
            self.restarts += self.processes.setdefault(i % len(self.pool.actors), result.process) != result.process
            self.processes[i % len(self.pool.actors)] = result.process
        scores, reward_s = self.score(units, [r.replies for r in results], self.prompts)
        rewards = torch.tensor([[s for s, _ in group] for group in scores], dtype=torch.float64, device="cpu")
        advantages = group_advantages(rewards, kind=rl.advantage)
        samples = [Sample(unit.ids, reply, float(advantages[i, j]),
                          None if result.ref_logps is None else result.ref_logps[j])
                   for i, (unit, result) in enumerate(zip(units, results)) for j, reply in enumerate(result.replies)]
        statuses = [status for group in scores for _, status in group]
        lengths = [len(s.reply) for s in samples]
        stats = {"reward_mean": rewards.mean().item(), "accuracy": (rewards >= 1).double().mean().item(),
                 "reply_len": float(np.mean(lengths)),
                 "truncated": float(np.mean([not s.reply or s.reply[-1] not in self.stops for s in samples])),
                 **{name: statuses.count(status) for status, name in COUNTED.items()},
                 "rollout_s": rollout_s, "reward_s": reward_s, "rollout_restarts": self.restarts}
        return samples, stats

    def score(self, units: list[Unit], replies: list[list[list[int]]], prompts) -> tuple[list, float]:
        groups = [([self.text(r) for r in group], [prompts[u.prompt].example] * len(group))
                  for u, group in zip(units, replies)]
        return score_groups(self.job.rl.reward, groups, timeout_s=self.job.rl.reward_timeout_s,
                            cpus=self.job.rl.reward_cpus)

    def evaluate(self, *, policy: str, version: int) -> dict:
        """Greedy answers to the held-out prompts: val/accuracy (reward >= 1) and val/reward_mean."""
        greedy = dataclasses.replace(self.sampling, temperature=0.0, reference=False)
        units = [Unit(i, p.ids, (0,)) for i, p in enumerate(self.eval_prompts)]
        results = self.pool.run(units, greedy, policy=policy, version=version, step=-1)
        scores, _ = self.score(units, [r.replies for r in results], self.eval_prompts)
        rewards = np.array([group[0][0] for group in scores])
        return {"val/accuracy": float((rewards >= 1).mean()), "val/reward_mean": float(rewards.mean())}


def rollout_batch(samples: list[Sample], *, width: int, device: torch.device, reference: bool) -> RolloutBatch:
    """Samples as rows of `width` tokens (prompt, reply, padding) with their reply mask, advantages and, with
    `reference`, the reference's log-probs: built in host memory, then moved to the device whole."""
    tokens = np.zeros((len(samples), width), dtype=np.int64)
    mask = np.zeros((len(samples), width - 1), dtype=np.float32)
    ref = np.zeros((len(samples), width - 1), dtype=np.float32)
    for row, s in enumerate(samples):
        n, start = len(s.prompt) + len(s.reply), len(s.prompt) - 1
        tokens[row, :n] = [*s.prompt, *s.reply]
        mask[row, start:n - 1] = 1
        if s.ref_logp is not None:
            ref[row, start:n - 1] = s.ref_logp
    advantages = np.array([s.advantage for s in samples], dtype=np.float32)
    to_device = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return RolloutBatch(to_device(tokens), to_device(mask), to_device(advantages),
                        to_device(ref) if reference else None)


class RLTrainer:
    def __init__(self, job: RLJob, *, report: Callable[[dict, str | None], None] | None = None,
                 lease: str | None = None):
        self.job, self.report = job, report
        rl = job.rl
        self.d = init_distributed(rl.device)
        self.found = decided_on_rank0(lambda: find_checkpoint(rl.policy), rank=self.d.rank)
        self.cfg = self.found.cfg
        self.tokenizer = load_tokenizer(self.found.tokenizer, where=rl.policy)
        self.model = shard_on_meta(self.cfg, self.d, job.parallel)
        self.model.to_empty(device=self.d.device)
        self.optimizer = build_optimizer(self.model, optim=job.optim, width_mult=self.cfg.width_mult)
        self.scheduler = build_scheduler(self.optimizer, optim=job.optim, total_steps=rl.steps)
        self.ckpt = Checkpointer(job.run.dir, job.checkpoint, rank=self.d.rank, device=self.d.device, lease=lease)
        self.start_step = self.resume()
        self.model.init_buffers()
        self.model.train()
        self.objective = GRPO(clip_eps=rl.clip_eps, kl_coef=rl.kl_coef)
        self.sink = MetricsLog(job.run.dir, start_step=self.start_step) if self.d.rank == 0 else None
        self.rollouts: Rollouts | None = None
        decided_on_rank0(self.start_rollouts, rank=self.d.rank)  # a bad prompts file stops every rank alike
        self.version = self.start_step
        self.policy = ""

    def start_rollouts(self) -> None:
        self.rollouts = Rollouts(self.job, self.found, self.tokenizer)

    def resume(self) -> int:
        """The run's newest committed checkpoint (weights, optimizer, step), else the weights of rl.policy at
        step 0 with a fresh optimizer."""
        own = decided_on_rank0(lambda: checkpoint.latest_committed(self.job.run.dir), rank=self.d.rank)
        if own is None:
            if self.found.hf:
                from trainer.hf import load_hf_weights

                load_hf_weights(self.model, self.found.path)
            else:
                checkpoint.load(self.found.path, self.model, None)
            return 0
        state = checkpoint.read_train_state(own)
        checkpoint.check_continues(state, identity(self.job, self.cfg), own, own=True)
        checkpoint.load(own, self.model, self.optimizer)
        set_schedule_step(self.scheduler, state["step"])
        if self.d.rank == 0:
            log.info("resumed from %s at step %d (saved by %d workers, now %d)", own, state["step"], state["world"],
                     self.d.world)
        return state["step"]

    def sync(self, version: int) -> float:
        """The policy of `version` to the actors; returns the seconds (the write, then every actor's load)."""
        t0 = time.perf_counter()
        path = storage.join(self.job.run.dir, POLICY_DIR, f"step-{version:06d}")
        checkpoint.write_weights(path, self.model)
        dist.barrier()
        if self.d.rank == 0:
            self.rollouts.pool.load(path, version)
            if self.policy and self.policy != path:
                storage.delete_dir(self.policy)
        self.policy, self.version = path, version
        return time.perf_counter() - t0

    def micro_batches(self, samples: list[Sample]) -> list[RolloutBatch]:
        """This rank's micro-batches of the step's samples, padded to the step's longest sequence."""
        width = max(len(s.prompt) + len(s.reply) for s in samples)
        return [rollout_batch([samples[i] for i in chosen], width=width, device=self.d.device,
                              reference=self.job.rl.kl_coef > 0)
                for chosen in rank_micro_batches(np.arange(len(samples)), micro_batch=self.job.rl.micro_batch,
                                                 rank=self.d.rank, world=self.d.world)]

    def update(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """rl.epochs optimizer steps over the step's samples; (the last one's loss, its gradient norm)."""
        batches = self.micro_batches(samples)
        for _ in range(self.job.rl.epochs):
            loss, norm, finite = train_step(self.model, self.optimizer, batches, objective=self.objective,
                                            grad_clip=self.job.optim.grad_clip,
                                            aux_weight=self.cfg.aux_loss_weight, global_batch=len(samples),
                                            before_update=self.ckpt.wait_staged)
            if not finite:
                raise TrainingDiverged(f"gradient norm is {norm.item()} (that update was skipped); lower --optim.lr")
        dist.all_reduce(loss)
        return loss, norm

    def train_state(self, step: int) -> dict:
        return {"step": step, "world": self.d.world, "rng": torch.get_rng_state().numpy().tobytes().hex(),
                "model": dataclasses.asdict(self.cfg), "optim": dataclasses.asdict(self.job.optim),
                "identity": identity(self.job, self.cfg)}

    def fit(self) -> list[dict]:
        rl = self.job.rl
        self.sync(self.start_step)
        history = []
        if self.start_step == 0 and rl.eval_prompts:
            history.append(self.publish({"step": 0, **self.evaluate()}))
        for step in range(self.start_step + 1, rl.steps + 1):
            t0 = time.perf_counter()
            payload = [self.rollouts.step(step, policy=self.policy, version=self.version) if self.d.rank == 0
                       else None]
            dist.broadcast_object_list(payload, src=0)
            samples, stats = payload[0]
            t1 = time.perf_counter()
            loss, norm = self.update(samples)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            update_s = time.perf_counter() - t1
            sync_s = self.sync(step)
            if step == rl.steps or (self.job.checkpoint.every and step % self.job.checkpoint.every == 0):
                self.ckpt.save(step, self.model, self.optimizer, self.train_state(step))
            if step % rl.log_every == 0 or step == rl.steps or self.is_eval_step(step):
                m = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": norm.item(), **stats,
                     **self.objective_stats(), "update_s": update_s, "sync_s": sync_s,
                     "step_time_s": time.perf_counter() - t0, "workers": self.d.world}
                if step == rl.steps:
                    m["checkpoint_final_wait_s"] = self.ckpt.finish()
                if self.is_eval_step(step):
                    m |= self.evaluate()
                history.append(self.publish(m))
            inject_fault(self.job.fault, run_dir=self.job.run.dir, step=step, rank=self.d.rank)
        return history

    def is_eval_step(self, step: int) -> bool:
        every = self.job.rl.eval_every
        return bool(self.job.rl.eval_prompts) and (step == self.job.rl.steps or (every > 0 and step % every == 0))

    def objective_stats(self) -> dict:
        """Means over the reply tokens of the steps since the last log: clip fraction, KL, entropy."""
        stats = self.objective.take_stats()
        dist.all_reduce(stats)
        clipped, kl, entropy, tokens = (stats / stats[3].clamp(min=1)).tolist()
        return {"clip_frac": clipped, "kl": kl, "entropy": entropy}

    def evaluate(self) -> dict:
        found = [self.rollouts.evaluate(policy=self.policy, version=self.version) if self.d.rank == 0 else None]
        dist.broadcast_object_list(found, src=0)
        return found[0]

    def publish(self, m: dict) -> dict:
        committed = self.ckpt.take_committed()
        if self.sink:
            self.sink.write(m)
        if self.report:
            self.report(m, committed if self.d.rank == 0 else None)
        return m

    def close(self) -> None:
        if self.d.rank == 0 and self.rollouts is not None:
            self.rollouts.pool.close()
        self.ckpt.close()
        if self.sink:
            self.sink.close()


def write_run_files(job: RLJob, tokenizer_files: dict[str, bytes]) -> None:
    """The resolved config and the policy's tokenizer, so the run directory is enough to generate from, chat with,
    evaluate or export."""
    from raylm.config import dump_toml

    storage.write_bytes(storage.join(job.run.dir, "config.toml"), dump_toml(job).encode())
    for name, data in tokenizer_files.items():
        storage.write_bytes(storage.join(job.run.dir, name), data)


def run(job: RLJob, *, report: Callable[[dict, str | None], None] | None = None, lease: str | None = None) -> dict:
    """The RL run on every rank; returns {"history": metrics of every log step}."""
    trainer = RLTrainer(job, report=report, lease=lease)
    try:
        if trainer.d.rank == 0:
            write_run_files(job, trainer.found.tokenizer)
        return {"history": trainer.fit()}
    finally:
        trainer.close()
