"""Preference tuning's losses are the papers': each variant against a direct, scalar implementation of its
publication's formula, and a reply's log-prob against a per-token sum."""

import math

import pytest
import torch

from trainer.dpo import DPOConfig, Preference, example_logps, pair_count, pair_losses


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def paper_loss(kind: str, beta: float, eps: float, gamma: float, pc, pr, rc, rr, lc, lr) -> float:
    """One pair's loss as each publication writes it (π: policy, ρ: reference log-probs summed over the reply)."""
    if kind == "sigmoid":  # DPO (Rafailov et al. 2023, eq. 7), with cDPO's label smoothing (TRL's `sigmoid`)
        u = beta * (pc - rc) - beta * (pr - rr)
        return -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
    if kind == "norm":  # length-normalised DPO (Tülu 3; TRL's `sigmoid_norm`): per-token log-ratios
        u = beta * ((pc - rc) / lc - (pr - rr) / lr)
        return -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
    if kind == "ipo":  # IPO (Azar et al. 2023, eq. 17): (h - 1/(2τ))², h = log [π(yw) ρ(yl) / (π(yl) ρ(yw))]
        h = math.log(math.exp(pc) * math.exp(rr) / (math.exp(pr) * math.exp(rc)))
        return (h - 1 / (2 * beta)) ** 2
    if kind == "simpo":  # SimPO (Meng et al. 2024, eq. 6): -log σ(β/|yw| log π(yw) - β/|yl| log π(yl) - γ)
        u = beta / lc * pc - beta / lr * pr - gamma
        return -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["sigmoid", "norm", "ipo", "simpo"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_each_loss_is_its_papers_formula(kind, eps):
    g = torch.Generator().manual_seed(0)
    n = 64
    pc, pr = -torch.rand(n, generator=g, dtype=torch.float64) * 5, -torch.rand(n, generator=g, dtype=torch.float64) * 5
    noise = torch.randn((2, n), generator=g, dtype=torch.float64)
    rc, rr = pc + noise[0], pr + noise[1]
    lc = torch.randint(1, 20, (n,), generator=g).double()
    lr = torch.randint(1, 20, (n,), generator=g).double()
    cfg = DPOConfig(loss=kind, beta=0.3, label_smoothing=eps, simpo_gamma=0.7)
    losses, reward_c, reward_r = pair_losses(cfg, (pc, pr), (rc, rr), (lc, lr))
    eps_used = 0.0 if kind == "ipo" else eps
    expected = [paper_loss(kind, 0.3, eps_used, 0.7, *(t[i].item() for t in (pc, pr, rc, rr, lc, lr)))
                for i in range(n)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    implicit = {"sigmoid": (pc - rc, pr - rr), "ipo": (pc - rc, pr - rr), "norm": ((pc - rc) / lc, (pr - rr) / lr),
                "simpo": (pc / lc, pr / lr)}[kind]
    assert torch.allclose(reward_c, 0.3 * implicit[0]) and torch.allclose(reward_r, 0.3 * implicit[1])


def test_policy_equal_to_reference_is_ln2_and_zero_rewards():
    pc, pr = torch.tensor([-3.0, -7.5], dtype=torch.float64), torch.tensor([-4.0, -1.0], dtype=torch.float64)
    lengths = (torch.tensor([3.0, 5.0], dtype=torch.float64),) * 2
    for kind in ("sigmoid", "norm"):
        losses, reward_c, reward_r = pair_losses(DPOConfig(loss=kind, beta=5.0), (pc, pr), (pc, pr), lengths)
        assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-12)
        assert reward_c.abs().max() == 0 and reward_r.abs().max() == 0


def preference_rows(g: torch.Generator, *, vocab: int, positions: int) -> torch.Tensor:
    """Two rows of packed pairs (tokens, example, loss planes): row 0 holds two pairs, row 1 one and padding."""
    rows = torch.zeros((2, 3, positions), dtype=torch.int64)
    rows[:, 0] = torch.randint(0, vocab, (2, positions), generator=g)
    layout = [[(1, 0, 5), (2, 5, 9), (3, 9, 12), (4, 12, 16)], [(1, 0, 6), (2, 6, 11)]]
    for r, examples in enumerate(layout):
        for example, start, end in examples:
            rows[r, 1, start:end] = example
            rows[r, 2, start + 2:end] = 1  # the reply: all but the example's first two tokens
    return rows


def test_example_logps_sums_each_reply_token_of_its_example():
    g = torch.Generator().manual_seed(1)
    rows = preference_rows(g, vocab=11, positions=17)
    logits = torch.randn((2, 16, 11), generator=g)
    sums, counts = example_logps(logits, rows)
    logp = torch.log_softmax(logits.double(), -1)
    for r in range(2):
        for example in range(1, 5):
            targets = [t for t in range(16) if rows[r, 1, t + 1] == example == rows[r, 1, t] and rows[r, 2, t + 1]]
            expected = sum(logp[r, t, rows[r, 0, t + 1]].item() for t in targets)
            assert sums[r, example].item() == pytest.approx(expected, abs=1e-5)  # fp32 cross-entropy
            assert counts[r, example].item() == len(targets)
    assert pair_count(rows).item() == 3 and pair_count(rows[:0]).item() == 0


def test_step_loss_is_the_mean_over_pairs_plus_the_sft_term(tmp_path):
    """Preference.loss over one batch: the papers' mean over the batch's pairs (reference plane read from the rows'
    float64 bits), plus sft_weight times the chosen replies' token-mean NLL."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(2)
    rows = preference_rows(g, vocab=11, positions=17)
    ref = torch.zeros((2, 17), dtype=torch.float64)
    ref[:, 1:5] = -torch.rand((2, 4), generator=g, dtype=torch.float64) * 4
    batch = torch.cat([rows, ref.view(torch.int64)[:, None]], 1)
    logits = torch.randn((1, 2, 16, 11), generator=g)[0].requires_grad_()

    class Fixed(torch.nn.Module):  # a "model" whose logits are given: what the loss does with them is under test
        def forward(self, tokens, segments=None):
            return logits, torch.zeros(())

    own = not dist.is_initialized()  # an in-process trainer run of an earlier test leaves its one-rank group
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert dist.get_world_size() == 1
        objective = Preference(DPOConfig(loss="sigmoid", beta=0.5, sft_weight=0.25))
        totals = objective.totals([batch])
        loss, _ = objective.loss(Fixed(), batch, totals)
    finally:
        if own:
            dist.destroy_process_group()
    sums, counts = example_logps(logits.detach(), rows)
    expected, chosen_nll, chosen_tokens = 0.0, 0.0, 0.0
    for r, pairs in ((0, 2), (1, 1)):
        for j in range(pairs):
            c, rj = 2 * j + 1, 2 * j + 2
            expected += paper_loss("sigmoid", 0.5, 0.0, 0.0, sums[r, c].item(), sums[r, rj].item(), ref[r, c].item(),
                                   ref[r, rj].item(), 1, 1)
            chosen_nll -= sums[r, c].item()
            chosen_tokens += counts[r, c].item()
    assert loss.item() == pytest.approx(expected / 3 + 0.25 * chosen_nll / chosen_tokens, rel=1e-6)
    stats = objective.take_stats()
    assert stats[-1].item() == 3 and objective.take_stats() is None
