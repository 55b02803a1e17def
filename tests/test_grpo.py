"""GRPO's advantages, loss and rewards against direct implementations of the publications' formulas: DeepSeekMath
(Shao et al. 2024) eq. 3 with the k3 KL of its eq. 4, veRL's documented `token-mean` aggregation, Dr. GRPO (Liu et
al. 2025); and the reward checkers' bounds."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch
from torch import nn

from trainer.distributed import init_distributed
from trainer.rl.grpo import GRPO, RolloutBatch, group_advantages
from trainer.rl.rewards import arithmetic, exact_match, final_answer, numeric, score_one


@pytest.fixture(autouse=True, scope="module")
def one_process_group():
    init_distributed("cpu")  # GRPO's token count is all-reduced


def paper_advantages(rewards: list[list[float]], *, std: bool) -> list[list[float]]:
    """DeepSeekMath §4.1.2: r̃_i = (r_i − mean(r)) / std(r) (std as torch.std and veRL: unbiased, + 1e-6); Dr. GRPO
    drops the division."""
    out = []
    for group in rewards:
        mean = statistics.fmean(group)
        scale = statistics.stdev(group) + 1e-6 if std else 1.0
        out.append([(r - mean) / scale for r in group])
    return out


@pytest.mark.parametrize("kind", ["grpo", "drgrpo"])
def test_advantages_are_the_papers(kind):
    rng = random.Random(0)
    rewards = [[rng.choice([0.0, 1.0, 0.5, rng.random()]) for _ in range(6)] for _ in range(5)] + [[1.0] * 6]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), kind=kind)
    want = paper_advantages(rewards, std=kind == "grpo")
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert got[-1].abs().max() == 0  # a group that all scored alike teaches nothing


class FixedLogits(nn.Module):
    """A "model" whose logits are a parameter: the loss's gradient is then the policy gradient itself."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, tokens):
        return self.logits[: len(tokens)], torch.zeros(())


def random_batch(seed: int, *, rows=6, width=9, vocab=7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, width), generator=g)
    mask = torch.zeros(rows, width - 1)
    for i in range(rows):  # a prompt of 1..3 tokens, then a reply of at least one token
        start = int(torch.randint(0, 3, (), generator=g))
        end = int(torch.randint(start + 1, width - 1, (), generator=g)) + 1
        mask[i, start:end] = 1
    logits = torch.randn(rows, width - 1, vocab, generator=g)
    advantages = torch.randn(rows, generator=g, dtype=torch.float64).float()
    return tokens, mask, logits, advantages, g


def paper_loss(logp, old, ref, mask, advantages, *, eps, beta) -> float:
    """−(token-mean of DeepSeekMath's eq. 3 integrand): Σ_i Σ_t min(r A, clip(r, 1−ε, 1+ε) A) − β D_KL over every reply
    token, divided by Σ_i |o_i| (veRL's token-mean); D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1 (eq. 4)."""
    total, count = 0.0, 0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            a = advantages[i]
            surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            total += surrogate - beta * kl
            count += 1
    return -total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_clipped_loss_with_k3_kl_is_the_papers_token_mean(seed):
    tokens, mask, logits, advantages, g = random_batch(seed)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g)  # ratios well outside [0.8, 1.2]: clipping active
    ref = logp + 0.5 * torch.randn(logp.shape, generator=g)
    objective = GRPO(clip_eps=0.2, kl_coef=0.04)
    batch = RolloutBatch(tokens, mask, advantages, ref, old_logp=old)
    # two micro-batches, as a rank with gradient accumulation runs them: the token count is the step's
    halves = [RolloutBatch(tokens[s], mask[s], advantages[s], ref[s], old_logp=old[s]) for s in (slice(0, 2),
                                                                                               slice(2, None))]
    totals = objective.totals(halves)
    model = FixedLogits(logits)
    got = sum(objective.loss(FixedLogits(logits[s]), b, totals)[0] for s, b in zip((slice(0, 2), slice(2, None)),
                                                                                    halves))
    want = paper_loss(logp.tolist(), old.tolist(), ref.tolist(), mask, advantages.tolist(), eps=0.2, beta=0.04)
    assert abs(got.item() - want) < 1e-6
    assert abs(objective.loss(model, batch, objective.totals([batch]))[0].item() - want) < 1e-6
    clipped, kl, _, count = objective.take_stats().tolist()
    assert count == 2 * mask.sum().item() and clipped > 0 and kl > 0


@pytest.mark.parametrize("kind", ["grpo", "drgrpo"])
def test_on_policy_without_kl_the_gradient_is_reinforce_with_the_group_baseline(kind):
    """One epoch (the ratio is 1 as the step starts) and no KL: ∇loss = −Σ_i A_i Σ_t ∇log π(o_it) / Σ_i |o_i|, the
    REINFORCE gradient with each group's mean reward as the baseline (Dr. GRPO; GRPO scales it by 1 / std)."""
    tokens, mask, logits, _, g = random_batch(7, rows=8)
    rewards = torch.randint(0, 2, (2, 4), generator=g).double()
    rewards[0, 0], rewards[0, 1] = 1.0, 0.0  # every group has both outcomes
    rewards[1, 0], rewards[1, 1] = 1.0, 0.0
    advantages = group_advantages(rewards, kind=kind).flatten().float()
    model = FixedLogits(logits)
    objective = GRPO(clip_eps=0.2, kl_coef=0.0)
    batch = RolloutBatch(tokens, mask, advantages, None)
    loss, _ = objective.loss(model, batch, objective.totals([batch]))
    loss.backward()

    reference = FixedLogits(logits)
    logp = torch.log_softmax(reference.logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    baseline = rewards.mean(dim=1, keepdim=True)
    scale = rewards.std(dim=1, keepdim=True) + 1e-6 if kind == "grpo" else torch.ones(2, 1, dtype=torch.float64)
    weights = ((rewards - baseline) / scale).flatten().float()
    (-(weights[:, None] * logp * mask).sum() / mask.sum()).backward()
    assert torch.allclose(model.logits.grad, reference.logits.grad, atol=1e-7)
    assert model.logits.grad.abs().max() > 1e-3


def test_final_answers_and_the_built_in_rewards():
    assert final_answer("so it is\n#### 42") == "42" and final_answer("x\nAnswer: 7 ") == "7"
    assert final_answer("first\n\n second line \n") == "second line"
    assert exact_match("apple", "apple") == 1.0 and exact_match("apple river", "apple") == 0.0
    assert numeric("the total is 1,234", 1234) == 1.0 and numeric("#### 3/4", "0.75") == 1.0
    assert numeric("#### 2*(3+4)", 14) == 1.0 and numeric("13", 14) == 0.0 and numeric("none", 1) == 0.0


@pytest.mark.parametrize("text, value", [("1 + 2 * 3", 7.0), ("-(4 - 6) ** 2", -4.0), ("7 // 2 + 7 % 2", 4.0),
                                         ("1,000.5", 1000.5), ("10 ** 12", 1e12)])
def test_arithmetic_evaluates_numbers_and_operators(text, value):
    assert arithmetic(text) == value


@pytest.mark.parametrize("text", ["9 ** 9 ** 9", "10 ** 100", "2 ** 65", "1 / 0", "__import__('os')", "x + 1",
                                  "[1] * 3", "'a' * 3", "1" * 300, "(1).real", "lambda: 1"])
def test_arithmetic_refuses_what_is_not_bounded_arithmetic(text):
    assert arithmetic(text) is None


def test_a_reward_that_raises_hangs_or_returns_no_number_scores_zero_and_says_which():
    def reward(reply, answer, example):
        if reply == "raise":
            raise ValueError("boom")
        if reply == "hang":
            import time

            time.sleep(5)
        if reply == "text":
            return "1.0"
        if reply == "nan":
            return float("nan")
        return 1.0

    got = {reply: score_one(reward, reply, {"answer": 1}, timeout_s=0.2)
           for reply in ("raise", "hang", "text", "nan", "ok")}
    assert got == {"raise": (0.0, "error"), "hang": (0.0, "timeout"), "text": (0.0, "invalid"),
                   "nan": (0.0, "invalid"), "ok": (1.0, "ok")}
