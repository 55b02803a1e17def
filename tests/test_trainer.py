"""The trainer on real FSDP2 (gloo, 2 processes), real Ray Train and real moto S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from pathlib import Path
from pyarrow.fs import FileSelector

from helpers import TINY, losses, metrics, run_captured, trainer_cli, within
from raylm import storage
from raylm.ray_session import free_port

@pytest.mark.heavy
def test_any_world_size_gives_the_same_run(stdlib_dataset, tmp_path):
    """The proof that data order and math do not depend on the world size: W=3 does not divide the batch of 16 (shares
    of 6, 5, 5 rows; ragged and empty micro-batches), yet every step's loss matches W=1; and a run killed on W=2
    continues on W=3 with the same losses."""
    common = ["--data.path", stdlib_dataset, "--train.steps=20", "--train.log_every=1", "--train.eval_every=10",
              "--train.global_batch=16", "--train.micro_batch=4", "--checkpoint.every=10"]
    one = trainer_cli(*common, "--run.dir", str(tmp_path / "w1"))
    assert one.returncode == 0, one.stderr[-3000:]
    three = trainer_cli(*common, "--run.dir", str(tmp_path / "w3"), torchrun=3)
    assert three.returncode == 0, three.stderr[-3000:]
    reference, vals = losses(str(tmp_path / "w1")), val_losses(str(tmp_path / "w1"))
    assert len(reference) == 20 and reference[-1] < reference[0] and len(vals) == 3
    assert within(losses(str(tmp_path / "w3")), reference) and within(val_losses(str(tmp_path / "w3")), vals)
    assert "step     20 | loss" in one.stdout and (tmp_path / "w3" / "config.toml").exists()

    resized = str(tmp_path / "w2to3")
    killed = trainer_cli(*common, "--run.dir", resized, "--fault.kill_at_step=12", torchrun=2)
    assert killed.returncode != 0 and (tmp_path / "w2to3" / "fault-injected-step-000012").exists()
    resumed = trainer_cli(*common, "--run.dir", resized, torchrun=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 10 (saved by 2 workers, now 3)" in resumed.stderr
    assert [m["step"] for m in metrics(resized) if "loss" in m] == list(range(1, 21))
    assert within(losses(resized), reference) and within(val_losses(resized), vals)


def val_losses(run_dir: str) -> list[float]:
    return [m["val_loss"] for m in metrics(run_dir) if "val_loss" in m]


def grad_shards_worker(rank: int, world: int, port: int, dataset: str, unsharded: bool, out: str) -> None:
    """One gloo rank: a real step of 4 micro-batches, recording after each backward whether every gradient is this
    rank's shard only; then a step whose gradient turns NaN, which must change no weight and no AdamW step count."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from raylm.config import load_config
    from raylm.dataset import open_dataset
    from trainer.data import BatchPlan, StepLoader
    from trainer.distributed import Dist
    from trainer.job import JobConfig
    from trainer.optim import build_optimizer
    from trainer.train import build_model, resolve_model, train_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    job = load_config(JobConfig, "configs/tiny.toml", [])
    ds = open_dataset(dataset)
    resolve_model(job, ds)
    model = build_model(job, Dist(rank, world, torch.device("cpu")))
    plan = BatchPlan(global_batch=16, micro_batch=2, world=world)
    batches = StepLoader(ds.train, plan=plan, rank=rank, seed=0).batches(0)
    seen = []

    def check(i: int) -> None:
        for p in model.parameters():
            g = p.grad
            seen.append(isinstance(g, DTensor) and g.placements[0].is_shard()
                        and g.to_local().numel() <= -(-p.numel() // world))

    optimizer = build_optimizer(model, optim=job.optim, width_mult=job.model.width_mult)
    train_step(model, optimizer, batches, grad_clip=1.0, aux_weight=0.0, global_batch=16,
               sync_every_micro_batch=not unsharded, after_backward=check)
    before = [p.detach().clone() for p in model.parameters()]

    def poison(i: int) -> None:  # a NaN gradient, as an overflow would make
        if i == len(batches) - 1:
            next(model.parameters()).grad.fill_(float("nan"))

    _, _, finite = train_step(model, optimizer, batches, grad_clip=1.0, aux_weight=0.0, global_batch=16,
                              sync_every_micro_batch=not unsharded, after_backward=poison)
    skipped = not finite.item() and all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and all(
        optimizer.state[p]["step"].item() == 1 for p in model.parameters())
    if rank == 0:
        Path(out).write_text(json.dumps({"micro_batches": len(batches), "sharded": seen, "skipped": skipped}))
    dist.destroy_process_group()


@pytest.mark.heavy
def test_gradients_stay_sharded_after_every_micro_batch(stdlib_dataset, tmp_path):
    """ZeRO-3 keeps only a 1/W shard of each gradient; accumulating unsharded (the opt-in) would hold them whole."""
    import torch.multiprocessing as mp

    found = {}
    for unsharded in (False, True):
        out = tmp_path / f"{unsharded}.json"
        mp.spawn(grad_shards_worker, args=(2, free_port(), stdlib_dataset, unsharded, str(out)), nprocs=2)
        found[unsharded] = json.loads(out.read_text())
    sharded = found[False]
    assert sharded["micro_batches"] == 4 and len(sharded["sharded"]) > 4 and all(sharded["sharded"])
    assert sharded["skipped"] and found[True]["skipped"], "a non-finite step must leave weights and AdamW untouched"
    per_micro = len(found[True]["sharded"]) // 4
    assert not any(found[True]["sharded"][:3 * per_micro]), "the opt-in reduces only after the last micro-batch"


def tensorboard_scalars(tb_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_ray_train_from_s3_to_s3_reports_where_it_writes(local_ray, s3_stdlib_dataset, s3_server, tmp_path):
    """Two workers reading from and writing to S3: what Ray's Result and the run directory's metrics and TensorBoard
    events hold. That the loss falls, on S3 across nodes: tests/test_multinode.py; exact repeats (a resumed run has
    an uninterrupted one's losses, bit for bit): tests/test_checkpoint.py."""
    from raylm.config import load_config
    from trainer.job import JobConfig
    from trainer.ray_launch import launch

    def train(run_dir: str):
        job = load_config(JobConfig, None, [*TINY[2:], "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4",
                                            "--model.n_kv_heads=2", "--model.ffn_hidden=192", "--data.path",
                                            s3_stdlib_dataset, "--run.dir", run_dir, "--train.steps=60",
                                            "--train.log_every=20", "--train.eval_every=30", "--ray.num_workers=2"])
        return launch(job)

    result = train(f"{s3_server}/runs/a")
    first = metrics(f"{s3_server}/runs/a")
    vals = [m["val_loss"] for m in first if "val_loss" in m]
    assert [m["step"] for m in first if "val_loss" in m] == [0, 30, 60] and vals[-1] < vals[0], vals
    assert result.error is None and result.return_value["history"] == first  # rank 0 returns what it logged
    assert result.metrics["step"] == 60 and result.metrics["loss"] == losses(f"{s3_server}/runs/a")[-1]
    assert result.checkpoint.path.endswith("runs/a/checkpoints/step-000060")  # reported where it lies
    local_tb = tmp_path / "tb"
    local_tb.mkdir()
    fs, root = storage.filesystem(f"{s3_server}/runs/a/tb")
    for info in fs.get_file_info(FileSelector(root)):
        (local_tb / os.path.basename(info.path)).write_bytes(storage.read_bytes("s3://" + info.path))
    scalars = tensorboard_scalars(str(local_tb))
    assert len(scalars["loss"]) == 4 and scalars["tokens_per_s"][-1] > 0 and len(scalars["val_loss"]) == 3  # 20,30,40,60
    assert storage.exists(f"{s3_server}/runs/a/config.toml")
    assert not storage.exists(f"{s3_server}/runs/a/.validate_storage_marker")  # Ray Train's, gone with the fit


def test_cli_help_and_one_line_errors(stdlib_dataset, tmp_path):
    from trainer.__main__ import main

    help_proc = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True)
    assert help_proc.returncode == 0 and "--optim.lr (float, default 0.0003)" in help_proc.stdout
    assert "--ray.num_workers" in help_proc.stdout and "--no-ray" in help_proc.stdout
    cases = {
        "--optim.lr=abc": "error: --optim.lr='abc' is not a valid float",
        "--model.dim=-1": "error: model.dim=-1 must be > 0",
        "--train.global_batch=1": "error: train.global_batch=1 is smaller than the 2 workers",
        "--train.global_batch=100000": "train rows, fewer than one step takes (train.global_batch=100000)",
    }
    for arg, expected in cases.items():
        code, _, err = run_captured(main, ["--data.path", stdlib_dataset, "--run.dir", tmp_path, arg])
        last = err.strip().splitlines()[-1]
        matches = last.startswith(expected) if expected.startswith("error: ") else expected in last
        assert code == 2 and last.startswith("error: ") and matches, err
    code, _, err = run_captured(main, ["--data.path", tmp_path / "missing", "--run.dir", tmp_path])
    assert code == 2 and "is not a finished raylm dataset" in err and len(err.strip().splitlines()) == 1


@pytest.mark.heavy
def test_bf16_activation_checkpointing_and_compile_follow_the_fp32_eager_run_on_cpu(stdlib_dataset, tmp_path):
    """Each step's loss within what its arithmetic explains of the fp32 eager run's: bf16 compute (fp32 master
    weights and reductions) with full AC within 1e-3 relative (measured: 8e-5 over 8 steps, bf16's epsilon being
    4e-3); fp32 under torch.compile with selective AC, which only reorders fp32 arithmetic, within 1e-5 (measured:
    7e-8). A step out of place or a recomputation that differs moves a loss by ~1e-2."""
    runs = {"eager": ([], 0), "bf16": (["--parallel.mixed_precision=bf16", "--parallel.activation_checkpointing=full"],
                                        1e-3),
            "compile": (["--parallel.activation_checkpointing=selective", "--parallel.compile=true"], 1e-5)}
    found = {}
    for name, (extra, _) in runs.items():
        proc = trainer_cli("--data.path", stdlib_dataset, "--run.dir", str(tmp_path / name), "--train.steps=4",
                           "--train.log_every=1", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[name] = losses(str(tmp_path / name))
    assert len(found["eager"]) == 4 and found["eager"][-1] < found["eager"][0]
    for name in ("bf16", "compile"):
        assert within(found[name], found["eager"], rel=runs[name][1]), (name, found[name], found["eager"])


def test_logged_loss_is_the_mean_over_the_window(stdlib_dataset, tmp_path):
    """One step's loss swings; each log line carries the mean of the steps since the previous one."""
    from trainer.__main__ import main

    common = ["--no-ray", *TINY, "--data.path", stdlib_dataset, "--train.steps=6", "--train.eval_every=0",
              "--ray.num_workers=1"]
    for every in (1, 3):
        code, _, err = run_captured(main, [*common, f"--train.log_every={every}", "--run.dir", tmp_path / str(every)])
        assert code == 0, err
    per_step, windowed = losses(str(tmp_path / "1")), losses(str(tmp_path / "3"))
    assert len(per_step) == 6 and len(windowed) == 2
    for i, mean in enumerate(windowed):
        assert mean == pytest.approx(sum(per_step[3 * i: 3 * i + 3]) / 3, rel=1e-6)


def test_a_non_finite_step_makes_no_update_and_stops_the_run_before_the_next_save(stdlib_dataset, tmp_path):
    """The norm is checked on device (no host sync per step): the step's update is skipped and the run stops with
    one line at the next save or log step, so no checkpoint ever holds the state after it."""
    from trainer.__main__ import main

    run_dir = tmp_path / "run"
    code, _, err = run_captured(main, ["--no-ray", *TINY, "--data.path", stdlib_dataset, "--run.dir", run_dir,
                                       "--optim.lr=1e8", "--optim.grad_clip=0", "--optim.warmup_steps=1",
                                       "--train.steps=12", "--train.log_every=6", "--checkpoint.every=1"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: gradient norm is nan at step 2 (that "
                                                                  "update was skipped); lower --optim.lr"), err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001"]
