"""The trainer on real FSDP2 (gloo, 2 processes), real Ray Train and real moto S3."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from pyarrow.fs import FileSelector

from conftest import run_captured
from raylm import storage
from trainer.train import free_port

TINY = ["--config", "configs/tiny.toml", "--train.global_batch=8", "--train.micro_batch=2", "--optim.lr=3e-3",
        "--optim.warmup_steps=5", "--train.sample_prompt=", "--train.eval_rows=16"]


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(l) for l in storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode().splitlines()]


def losses(run_dir: str) -> list[float]:
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


def trainer_cli(*args, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                "--master_port", str(free_port()), "-m", "trainer"] if torchrun else [sys.executable, "-m", "trainer"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "--no-ray", *TINY, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.e2e
def test_two_fsdp_ranks_match_one_process(stdlib_dataset, tmp_path):
    """The proof that data order and math do not depend on the world size."""
    common = ["--data.path", stdlib_dataset, "--train.steps=20", "--train.log_every=1", "--train.eval_every=10"]
    one = trainer_cli(*common, "--run.dir", str(tmp_path / "w1"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = trainer_cli(*common, "--run.dir", str(tmp_path / "w2"), torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(str(tmp_path / "w1")), losses(str(tmp_path / "w2"))
    assert len(a) == len(b) == 20 and a[-1] < a[0]
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5
    vals = [[m["val_loss"] for m in metrics(str(tmp_path / d)) if "val_loss" in m] for d in ("w1", "w2")]
    assert len(vals[0]) == 3 and max(abs(x - y) / x for x, y in zip(*vals)) <= 1e-5
    assert "step     20 | loss" in one.stdout and (tmp_path / "w2" / "config.toml").exists()


def tensorboard_scalars(tb_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.s3
def test_ray_train_from_s3_to_s3_learns_and_repeats_exactly(local_ray, s3_stdlib_dataset, s3_server, tmp_path):
    from raylm.config import load_config
    from trainer.job import JobConfig
    from trainer.ray_launch import launch

    def train(run_dir: str):
        job = load_config(JobConfig, None, [*TINY[2:], "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4",
                                            "--model.n_kv_heads=2", "--model.ffn_hidden=192", "--data.path",
                                            s3_stdlib_dataset, "--run.dir", run_dir, "--train.steps=200",
                                            "--train.log_every=20", "--train.eval_every=100", "--ray.num_workers=2"])
        return launch(job)

    result = train(f"{s3_server}/runs/a")
    first = metrics(f"{s3_server}/runs/a")
    vals = [m["val_loss"] for m in first if "val_loss" in m]
    assert [m["step"] for m in first if "val_loss" in m] == [0, 100, 200]
    assert vals[-1] < vals[0] - 1.0, vals  # log(1000) ≈ 6.9 at init; the tiny model learns > 1 nat
    assert result.error is None and result.return_value["history"] == first  # rank 0 returns what it logged
    assert result.metrics["step"] == 200 and result.metrics["loss"] == losses(f"{s3_server}/runs/a")[-1]
    assert result.checkpoint.path.endswith("runs/a/checkpoints/step-000200")  # reported where it lies
    train(f"{s3_server}/runs/b")
    assert losses(f"{s3_server}/runs/a") == losses(f"{s3_server}/runs/b")
    assert [m["val_loss"] for m in metrics(f"{s3_server}/runs/b") if "val_loss" in m] == vals
    local_tb = tmp_path / "tb"
    local_tb.mkdir()
    fs, root = storage.filesystem(f"{s3_server}/runs/a/tb")
    for info in fs.get_file_info(FileSelector(root)):
        (local_tb / os.path.basename(info.path)).write_bytes(storage.read_bytes("s3://" + info.path))
    scalars = tensorboard_scalars(str(local_tb))
    assert len(scalars["loss"]) == 10 and scalars["tokens_per_s"][-1] > 0 and len(scalars["val_loss"]) == 3
    assert storage.exists(f"{s3_server}/runs/a/config.toml")


def test_cli_help_and_one_line_errors(stdlib_dataset, tmp_path):
    from trainer.__main__ import main

    help_proc = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True)
    assert help_proc.returncode == 0 and "--optim.lr (float, default 0.0003)" in help_proc.stdout
    assert "--ray.num_workers" in help_proc.stdout and "--no-ray" in help_proc.stdout
    cases = {
        "--optim.lr=abc": "error: --optim.lr='abc' is not a valid float",
        "--model.dim=-1": "error: model.dim=-1 must be > 0",
        "--train.global_batch=7": "error: train.global_batch=7 must be a multiple of world size 2",
    }
    for arg, expected in cases.items():
        code, _, err = run_captured(main, ["--data.path", stdlib_dataset, "--run.dir", tmp_path, arg])
        assert code == 2 and err.strip().splitlines()[-1].startswith(expected), err
    code, _, err = run_captured(main, ["--data.path", tmp_path / "missing", "--run.dir", tmp_path])
    assert code == 2 and "is not a finished raylm dataset" in err and len(err.strip().splitlines()) == 1


@pytest.mark.e2e
def test_bf16_activation_checkpointing_and_compile_run_on_cpu(stdlib_dataset, tmp_path):
    for extra in (["--parallel.mixed_precision=bf16", "--parallel.activation_checkpointing=full"],
                  ["--parallel.activation_checkpointing=selective", "--parallel.compile=true"]):
        run_dir = tmp_path / extra[-1].split("=")[1]
        proc = trainer_cli("--data.path", stdlib_dataset, "--run.dir", str(run_dir), "--train.steps=4",
                           "--train.log_every=2", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert all(math.isfinite(l) for l in losses(str(run_dir))) and len(losses(str(run_dir))) == 2


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
