"""MoE experts: the padded-buffer kernels against a per-expert loop, one compiled graph, experts sharded on dim 1
over more ranks than experts (training as on one rank, checkpoints resharded to other world sizes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raylm.ray_session import free_port
from trainer.model.config import ModelConfig
from trainer.model.transformer import MoE

torch.set_num_threads(2)
EXPERTS, DIM, HIDDEN = 4, 32, 24
"""Tiny: 2·HIDDEN = 48 and DIM = 32 rows of dim 1 split evenly over 8 ranks, which 4 experts do not."""
STEPS, GLOBAL_BATCH, MICRO_BATCH, SEQ = 3, 16, 2, 8


def moe_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, dim=DIM, n_layers=2, n_heads=4, ffn_hidden=HIDDEN, n_experts=EXPERTS,
                                 top_k=2, max_seq_len=SEQ), **overrides})


def moe_layer(dtype: torch.dtype, *, dim: int = DIM) -> MoE:
    torch.manual_seed(0)
    moe = MoE(moe_config(dim=dim, n_heads=2))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return moe.to(dtype)


def per_expert_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The reference: each expert's group of routed rows taken with host-known sizes and multiplied on its own."""
    flat = x.reshape(-1, x.shape[-1])
    weights, experts = F.softmax(moe.gate(flat).float(), dim=-1).topk(moe.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    order = experts.flatten().argsort(stable=True)
    token = order // moe.top_k
    groups = flat[token].split(torch.bincount(experts.flatten(), minlength=moe.n_experts).tolist())
    outs = []
    for e, group in enumerate(groups):
        gate, up = F.linear(group, moe.experts_w13[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, moe.experts_w2[e]))
    y = torch.cat(outs) * weights.flatten()[order, None]
    return torch.zeros_like(flat).index_add(0, token, y.type_as(flat)).view(x.shape)


def output_and_grads(moe, fn, x: torch.Tensor, probe: torch.Tensor) -> list[torch.Tensor]:
    """fn(x) and the gradients of <fn(x), probe> for x and every parameter of `moe`."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    (out.float() * probe).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in moe.parameters()]


@pytest.mark.parametrize("dtype,dim,grouped", [(torch.float32, DIM, False), (torch.bfloat16, DIM, True),
                                               (torch.bfloat16, 36, False)],
                         ids=["fp32-blocks", "bf16-grouped-mm", "bf16-unaligned-blocks"])
def test_experts_equal_the_per_expert_loop(dtype, dim, grouped):
    """Outputs and every gradient equal the loop's: to 1e-5 in fp32; in bf16 to its rounding. Ragged groups: 3·13
    tokens, one expert given none. bf16 with a dim that is no multiple of 8 takes the block kernel."""
    moe = moe_layer(dtype, dim=dim)
    assert moe.uses_grouped_mm() == grouped
    with torch.no_grad():
        moe.gate.weight[1] = -10.0 * moe.gate.weight[1].abs().sum() * torch.sign(moe.gate.weight[0])  # expert 1 idle
    x = torch.randn(3, 13, dim).to(dtype)
    probe = torch.randn(3, 13, dim)
    ours = output_and_grads(moe, moe, x, probe)
    loop = output_and_grads(moe, lambda t: per_expert_loop(moe, t), x, probe)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(ours, loop):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_compiles_to_one_graph_with_eager_results(dtype):
    """A transformer block with MoE traces as one graph, with no break (no host sync, no shape that depends on the
    routing); the MoE layer compiled with fullgraph=True gives eager's output and gradients."""
    from trainer.model.transformer import Block

    moe = moe_layer(dtype)
    x, probe = torch.randn(2, 9, DIM).to(dtype), torch.randn(2, 9, DIM)
    block = Block(moe_config(), 0).to(dtype)
    block.feed_forward = moe
    cos, sin = torch.ones(9, DIM // 4, dtype=dtype), torch.zeros(9, DIM // 4, dtype=dtype)
    explained = torch._dynamo.explain(block)(x, cos, sin)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for a, b in zip(output_and_grads(moe, compiled, x, probe), output_and_grads(moe, moe, x, probe)):
        torch.testing.assert_close(a, b, **tol)


# --- experts sharded on dim 1 (trainer/parallelize.py) ---

def job_config():
    from trainer.job import JobConfig

    job = JobConfig()
    job.model = moe_config()
    job.optim.lr, job.optim.warmup_steps = 3e-3, 0
    return job


def rank_micro_batches(rank: int, world: int, step: int) -> list[torch.Tensor]:
    """This rank's share of the step's rows, in micro-batches of MICRO_BATCH: the same micro-batches on any world
    size, so even the per-micro-batch load-balancing loss is the same."""
    rows = torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    share = rows[rank * GLOBAL_BATCH // world:(rank + 1) * GLOBAL_BATCH // world]
    return list(share.split(MICRO_BATCH))


def full_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Every weight and AdamW moment, gathered whole (collective)."""
    from trainer.parallelize import plain_name

    state = {}
    for name, p in model.named_parameters():
        state[plain_name(name)] = p.full_tensor()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{plain_name(name)}/{key}"] = optimizer.state[p][key].full_tensor()
    return state


def sharded_worker(rank: int, world: int, port: int, steps: int, save_to: str, load_from: str, out: str) -> None:
    """One gloo rank: `steps` training steps (recording each step's loss and each expert tensor's placement and local
    shape), then a checkpoint written to `save_to` and/or the one in `load_from` loaded (unless ""); rank 0 saves
    what it found and the gathered state."""
    import torch.distributed as dist

    from trainer.checkpoint import CheckpointConfig, Checkpointer, load
    from trainer.distributed import Dist
    from trainer.optim import build_optimizer
    from trainer.train import build_model, train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    job = job_config()
    model = build_model(job, Dist(rank, world, torch.device("cpu")))
    optimizer = build_optimizer(model, optim=job.optim, width_mult=1.0)
    result = {"experts": {n: (p.placements, tuple(p.to_local().shape), tuple(p.shape))
                          for n, p in model.named_parameters() if "experts" in n}, "losses": []}
    for step in range(steps):
        loss, _, _ = train_step(model, optimizer, rank_micro_batches(rank, world, step), grad_clip=1.0,
                                aux_weight=job.model.aux_loss_weight, global_batch=GLOBAL_BATCH)
        dist.all_reduce(loss)
        result["losses"].append(loss.item())
    if save_to:
        checkpointer = Checkpointer(save_to, CheckpointConfig(async_save=False), rank=rank, device=torch.device("cpu"))
        checkpointer.save(steps, model, optimizer, {"step": steps})
        checkpointer.close()
    if load_from:
        load(load_from, model, optimizer)
    result["state"] = full_state(model, optimizer)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def spawn(world: int, out, *, steps: int = 0, save_to="", load_from="") -> dict:
    import torch.multiprocessing as mp

    mp.spawn(sharded_worker, args=(world, free_port(), steps, str(save_to), str(load_from), str(out)), nprocs=world)
    return torch.load(out, weights_only=False)


@pytest.mark.heavy
def test_experts_shard_on_dim_1_train_as_one_rank_and_reshard(tmp_path):
    """8 ranks, 4 experts: each rank holds at most ⌈N / 8⌉ of the N rows of dim 1 of every expert (on dim 0 ranks
    0-3 would hold a whole expert each and ranks 4-7 none), and every step's loss equals one rank's to 1e-5,
    load-balancing loss included (its micro-batches are the same on both world sizes). Its checkpoint loads on 1 and
    on 3 ranks (where 48 rows of dim 1 split evenly, 32 do not: one tensor on dim 1, one on dim 0) with the same
    weights and AdamW moments."""
    from torch.distributed.tensor import Shard

    run = tmp_path / "w8"
    eight = spawn(8, tmp_path / "w8.pt", steps=STEPS, save_to=run)
    for name, (placements, local, shape) in eight["experts"].items():
        assert placements == (Shard(1),) and local[0] == EXPERTS and local[2] == shape[2], name
        assert local[1] <= math.ceil(shape[1] / 8), (name, local, shape)
    checkpoint = run / "checkpoints" / f"step-{STEPS:06d}"
    one = spawn(1, tmp_path / "w1.pt", steps=STEPS, load_from=checkpoint)  # trains, then loads the W=8 checkpoint
    assert len(eight["losses"]) == STEPS and eight["losses"][-1] != eight["losses"][0]
    assert eight["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-5)
    three = spawn(3, tmp_path / "w3.pt", load_from=checkpoint)
    placements = {n.split(".")[-1]: p for n, (p, _, _) in three["experts"].items()}
    assert placements == {"experts_w13": (Shard(1),), "experts_w2": (Shard(0),)}
    for loaded in (one, three):
        assert loaded["state"].keys() == eight["state"].keys()
        assert all(torch.equal(loaded["state"][k], v) for k, v in eight["state"].items())
