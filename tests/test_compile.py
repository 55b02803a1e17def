"""What a GPU run switches on — torch.compile, bf16 mixed precision, activation checkpointing, FSDP2 — run together on
CPU over 2 gloo ranks with ragged micro-batches (W does not divide the batch, so the ranks' last micro-batches differ
in size), dense and MoE: the compiled bf16 losses follow the eager fp32 ones within bf16's precision, and compiling
stops once every shape has been seen (no recompile per step, per layer or per routing)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from raylm.ray_session import free_port

pytestmark = pytest.mark.heavy  # the module's runs: compiled 2-rank FSDP2 training, ~30 s

GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB, STEPS = 7, 2, 32, 256, 5
MODEL = ["--model.dim=64", "--model.n_layers=3", "--model.n_heads=4", "--model.n_kv_heads=2",
         f"--model.vocab_size={VOCAB}", f"--model.max_seq_len={SEQ}", "--model.multiple_of=32", "--optim.lr=5e-3",
         "--optim.warmup_steps=1"]
MOE = ["--model.n_experts=4", "--model.top_k=2", "--model.aux_loss_weight=0"]
GPU_SWITCHES = ["--parallel.compile=true", "--parallel.mixed_precision=bf16", "--parallel.activation_checkpointing=full"]


def most_over_ranks(value: int) -> int:
    t = torch.tensor([value], device="cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def run_steps(overrides: list[str], rank: int, world: int, rows: torch.Tensor) -> dict:
    """Losses of STEPS training steps of a freshly built model on `rows`; the graphs compiled so far after each step
    and the graph breaks met, on the rank with the most (the ranks see different micro-batch shapes)."""
    from raylm.config import load_config
    from torch._dynamo.utils import counters
    from trainer.data import BatchPlan, micro_batches
    from trainer.distributed import Dist
    from trainer.job import JobConfig
    from trainer.optim import build_optimizer
    from trainer.train import build_model, train_step

    job = load_config(JobConfig, None, [*overrides, "--data.path=unused", "--run.dir=unused", "--train.device=cpu"])
    plan = BatchPlan(GLOBAL_BATCH, MICRO_BATCH, world)
    start, stop = plan.share(rank)
    torch._dynamo.reset()
    counters.clear()
    model = build_model(job, Dist(rank, world, torch.device("cpu")))
    optimizer = build_optimizer(model, optim=job.optim, width_mult=1.0)
    losses, graphs = [], []
    for step in range(STEPS):
        step_rows = rows[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        batches = micro_batches(step_rows[start:stop], micro_batch=plan.micro_batch, count=plan.grad_accum)
        loss, _, _ = train_step(model, optimizer, batches, grad_clip=1.0, aux_weight=0.0, global_batch=GLOBAL_BATCH)
        dist.all_reduce(loss)
        losses.append(loss.item())
        graphs.append(most_over_ranks(counters["stats"]["unique_graphs"]))
    return {"losses": losses, "graphs": graphs, "breaks": most_over_ranks(sum(counters["graph_break"].values()))}


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    starts = torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS, 1), generator=torch.Generator(device="cpu").manual_seed(0),
                           device="cpu")
    rows = (starts + torch.arange(SEQ + 1, device="cpu")) % VOCAB  # counting rows: a bigram to learn in a few steps
    found = {}
    for name, arch in (("dense", MODEL), ("moe", MODEL + MOE)):
        found[name] = {"eager": run_steps(arch, rank, world, rows),
                       "eager_bf16": run_steps(arch + ["--parallel.mixed_precision=bf16"], rank, world, rows),
                       "compiled": run_steps(arch + GPU_SWITCHES, rank, world, rows)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(found, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("compile") / "runs.json"
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2)
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_compiled_bf16_checkpointed_fsdp2_losses_follow_eager(runs, arch):
    """Within bf16's precision of the eager fp32 run, and closer still to the eager bf16 one."""
    eager, bf16 = runs[arch]["eager"]["losses"], runs[arch]["eager_bf16"]["losses"]
    compiled = runs[arch]["compiled"]["losses"]
    assert eager[-1] < eager[0] - 0.5, f"the eager run must learn for the comparison to say anything: {eager}"
    for step, (e, b, c) in enumerate(zip(eager, bf16, compiled)):
        assert c == pytest.approx(e, rel=1e-2), f"step {step}: compiled bf16 {c} vs eager fp32 {e}"
        assert c == pytest.approx(b, rel=5e-3), f"step {step}: compiled bf16 {c} vs eager bf16 {b}"


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_blocks_compile_whole_and_compiling_stops_after_the_first_step(runs, arch):
    """A graph break inside an activation-checkpointed block sends the whole block back to eager (the checkpoint's
    region is traced as one), so there must be none; and every micro-batch shape (2 rows, 1 row) appears in step 0,
    so a graph compiled later is a recompile a GPU run would pay again and again (a guard on routing counts, on a
    layer's identity, …)."""
    compiled = runs[arch]["compiled"]
    assert compiled["breaks"] == 0, f"{compiled['breaks']} graph breaks"
    assert compiled["graphs"][0] > 0, "nothing was compiled"
    assert compiled["graphs"][-1] == compiled["graphs"][0], f"graphs compiled after each step: {compiled['graphs']}"
