"""Checkpoints: a crash (a worker killed, restarts spent), an interrupted driver and damaged checkpoints, with RUN_DIR
local and in moto S3 (in-run restarts, resizes and S3 resumes across nodes: tests/test_multinode.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ON_S3, TINY, logged_steps, losses, metrics, run_captured, wait_for
from raylm import storage
from trainer.checkpoint import COMMITTED, list_checkpoints
from trainer.optim import OptimConfig, lr_factor

COMMON = [*TINY, "--train.log_every=1", "--train.eval_every=0", "--checkpoint.every=5", "--ray.num_workers=2",
          "--optim.schedule=constant"]
"""A constant lr after warmup: the lr of a step does not depend on train.steps, so a 20-step run's losses are the
first 20 of a 30-step run's, and one uninterrupted reference run serves every test."""


@pytest.fixture(params=["local", ON_S3])
def runs(request, tmp_path, stdlib_dataset):
    """Where run dirs go: a local directory or a moto S3 prefix (with a dataset on the same kind of storage)."""
    if request.param == "local":
        return str(tmp_path), stdlib_dataset
    return f"{request.getfixturevalue('s3_server')}/{tmp_path.name}", request.getfixturevalue("s3_stdlib_dataset")


def launch(dataset: str, run_dir: str, *args: str):
    from raylm.config import load_config
    from trainer.job import JobConfig
    from trainer.ray_launch import launch as ray_launch

    toml, overrides = COMMON[1], COMMON[2:]  # COMMON starts with --config FILE
    return ray_launch(load_config(JobConfig, toml, [*overrides, "--data.path", dataset, "--run.dir", run_dir, *args]))


@pytest.fixture(scope="module")
def reference(local_ray, stdlib_dataset, tmp_path_factory) -> list[float]:
    """Per-step losses of an uninterrupted 2-worker run of 30 steps."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "steps30")
    launch(stdlib_dataset, run_dir, "--train.steps=30")
    return losses(run_dir)


def only_committed(run_dir: str) -> list[int]:
    found = list_checkpoints(run_dir)
    assert all(ok for _, _, ok in found), found
    return [step for step, _, _ in found]


def test_damaged_metadata_is_a_data_error_that_keeps_its_cause_and_a_bug_keeps_its_traceback(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    from raylm.errors import DataError
    from trainer.checkpoint import is_storage_failure, verify

    step = tmp_path / "checkpoints" / "step-000005"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read its metadata") as caught:
        verify(str(step))
    assert caught.value.__cause__ is not None  # --debug shows the chain down to the unpickling error
    storage_failure = CheckpointException("save", {0: (FileNotFoundError("gone"), None)})
    bug = CheckpointException("save", {0: (FileNotFoundError("gone"), None), 1: (TypeError("a bug"), None)})
    assert is_storage_failure(storage_failure) and is_storage_failure(OSError("S3 timeout"))
    assert not is_storage_failure(bug) and not is_storage_failure(KeyError("x"))  # re-raised as is, traceback kept


def train_in_process(dataset: str, run_dir: str, *args: str) -> tuple[int, str]:
    from trainer.__main__ import main

    code, out, err = run_captured(main, ["--no-ray", *COMMON, "--data.path", dataset, "--run.dir", run_dir, *args])
    return code, out + err


def test_uncommitted_checkpoint_is_never_loaded_and_damaged_shards_are_named(runs, caplog):
    root, dataset = runs
    run_dir = storage.join(root, "damaged")
    assert train_in_process(dataset, run_dir, "--train.steps=10")[0] == 0
    step10 = storage.join(run_dir, "checkpoints", "step-000010")
    committed = storage.read_bytes(storage.join(step10, COMMITTED))
    storage.filesystem(step10)[0].delete_file(storage.filesystem(storage.join(step10, COMMITTED))[1])
    caplog.set_level("INFO", logger="trainer")
    code, _ = train_in_process(dataset, run_dir, "--train.steps=12")  # an upload cut off before its commit
    assert code == 0 and "skipping" in caplog.text and "resumed from" in caplog.text
    assert "step-000005 at step 5" in caplog.text
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == list(range(1, 13))

    step12 = storage.join(run_dir, "checkpoints", "step-000012")
    shard = storage.join(step12, "__0_0.distcp")
    data = storage.read_bytes(shard)
    storage.write_bytes(shard, data[: len(data) // 2])
    code, out = train_in_process(dataset, run_dir, "--train.steps=14")
    assert code == 2 and f"error: checkpoint shard {shard} is cut short" in out
    storage.filesystem(shard)[0].delete_file(storage.filesystem(shard)[1])
    code, out = train_in_process(dataset, run_dir, "--train.steps=14")
    assert code == 2 and f"error: checkpoint shard {shard} is missing" in out
    assert committed == b"10\n"


@pytest.fixture(scope="module")
def five_steps(stdlib_dataset, tmp_path_factory) -> str:
    """A finished in-process run of 5 steps (checkpoint at step 5), which the tests below read and never change."""
    run_dir = str(tmp_path_factory.mktemp("five-steps") / "run")
    assert train_in_process(stdlib_dataset, run_dir, "--train.steps=5")[0] == 0
    return run_dir


def test_resume_from_another_run_and_warm_start(stdlib_dataset, five_steps, tmp_path, caplog):
    source = five_steps
    caplog.set_level("INFO", logger="trainer")
    code, _ = train_in_process(stdlib_dataset, str(tmp_path / "warm"), "--train.steps=3",
                               f"--checkpoint.resume_from={source}", "--checkpoint.load_weights_only=true")
    assert code == 0 and "warm start from the weights of" in caplog.text and len(losses(str(tmp_path / "warm"))) == 3
    code, _ = train_in_process(stdlib_dataset, str(tmp_path / "cont"), "--train.steps=7",
                               f"--checkpoint.resume_from={source}/checkpoints/step-000005")
    assert code == 0 and [m["step"] for m in metrics(str(tmp_path / "cont")) if "loss" in m] == [6, 7]
    code, out = train_in_process(stdlib_dataset, str(tmp_path / "bad"), "--train.global_batch=16",
                                 f"--checkpoint.resume_from={source}")
    assert code == 2 and "was trained with train.global_batch=8; this run has train.global_batch=16" in out
    code, out = train_in_process(stdlib_dataset, str(tmp_path / "none"), f"--checkpoint.resume_from={tmp_path}")
    assert code == 2 and "holds no committed checkpoint" in out


def test_generate_and_export_read_a_run_directory(five_steps, tmp_path):
    from trainer.export import main as export_main
    from trainer.generate import main as generate_main

    run_dir = five_steps
    code, out, err = run_captured(generate_main, ["--checkpoint", run_dir, "--prompt", "def ", "--max_new_tokens", "8"])
    assert code == 0 and out.startswith("def ") and err == "", err
    code, out, err = run_captured(export_main, ["--checkpoint", f"{run_dir}/checkpoints/step-000005",
                                                "--out", tmp_path / "hf"])
    assert code == 0 and (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "tokenizer.model").exists()


def test_a_checkpoint_that_cannot_be_written_is_an_error_after_retries(stdlib_dataset, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000005").write_text("a file where the checkpoint directory must go")
    code, out = train_in_process(stdlib_dataset, str(run_dir), "--train.steps=5", "--checkpoint.retries=2")
    assert code == 2 and "step-000005 could not be written in 2 attempts" in out


# Re-running the same command continues the run, whatever stopped it (checkpoints every 5, keep 2).

def trainer_driver(run_dir: str, dataset: str, ray_address: str, *args: str) -> subprocess.Popen:
    """`python -m trainer` as a user starts it against a running cluster, in a process of its own to kill."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ray_address}
    return subprocess.Popen([sys.executable, "-m", "trainer", *COMMON, "--train.steps=30", "--data.path", dataset,
                             "--run.dir", run_dir, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    wait_for(f"step {step}", lambda: any(m["step"] >= step for m in logged_steps(run_dir)), proc, timeout)


def rerun_finishes_with_the_same_losses(run_dir: str, dataset: str, reference: list[float]) -> None:
    """The same command again: it continues from the newest committed checkpoint, although Ray's own record in
    RUN_DIR may still name checkpoints pruned since."""
    code, out = train_with_ray(dataset, run_dir, "--train.steps=30")
    assert code == 0, out[-3000:]
    assert losses(run_dir) == reference
    assert only_committed(run_dir) == [25, 30]


def train_with_ray(dataset: str, run_dir: str, *args: str) -> tuple[int, str]:
    from trainer.__main__ import main

    code, out, err = run_captured(main, [*COMMON, "--data.path", dataset, "--run.dir", run_dir, *args])
    return code, out + err


@pytest.mark.parametrize("runs", ["local"], indirect=True)  # S3 resumes: tests/test_multinode.py
def test_rerun_after_a_crash_with_retries_spent(local_ray, runs, reference):
    root, dataset = runs
    run_dir = storage.join(root, "crashed")
    code, out = train_with_ray(dataset, run_dir, "--train.steps=30", "--fault.kill_at_step=23", "--ray.max_failures=0")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "a worker died" in errors[0] and "run the same command" in errors[0]
    assert storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
    assert only_committed(run_dir) == [15, 20]  # step-000005 and -000010 pruned; Ray's record still names them
    rerun_finishes_with_the_same_losses(run_dir, dataset, reference)


def test_rerun_after_the_driver_is_interrupted_then_killed(local_ray, stdlib_dataset, tmp_path, reference):
    """Ctrl-C stops cleanly and says how to continue; the same command continues, is SIGKILLed (its whole process
    group, as a lost head node would), and once more the same command finishes with the uninterrupted losses."""
    run_dir, address = str(tmp_path / "run"), local_ray.get_runtime_context().gcs_address
    driver = trainer_driver(run_dir, stdlib_dataset, address)
    wait_for_step(run_dir, 13, driver)
    sent = time.monotonic()
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=60)
    assert time.monotonic() - sent < 15 and driver.returncode == 130
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("interrupted: run the same command again to continue from ")
    driver = trainer_driver(run_dir, stdlib_dataset, address)
    wait_for_step(run_dir, 23, driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.communicate(timeout=60)
    rerun_finishes_with_the_same_losses(run_dir, stdlib_dataset, reference)


def test_a_run_directory_of_another_model_is_one_line_and_left_untouched(stdlib_dataset, five_steps):
    run_dir = five_steps

    def checkpoint_files() -> dict:
        return {p: p.read_bytes() for p in (Path(run_dir) / "checkpoints").rglob("*") if p.is_file()}

    before = checkpoint_files()
    for arg, field in (("--model.dim=128", "model.dim=64"), ("--data.seed=1", "data.seed=0")):
        code, out = train_with_ray(stdlib_dataset, run_dir, arg)  # refused on the driver, before Ray starts
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and field in errors[0] and "use a new --run.dir" in errors[0], out
    assert checkpoint_files() == before


def test_a_finished_run_says_so_and_a_longer_one_continues(stdlib_dataset, tmp_path, caplog):
    """The check runs in the driver before Ray or the loop starts, so the in-process path shows it as well. A changed
    --optim.* value applies from the resumed step, and says so."""
    run_dir = str(tmp_path / "run")
    assert train_in_process(stdlib_dataset, run_dir, "--train.steps=10")[0] == 0
    code, out = train_in_process(stdlib_dataset, run_dir, "--train.steps=10")
    assert code == 0 and "already finished: its newest checkpoint is at step 10 and train.steps=10" in out
    caplog.set_level("WARNING", logger="trainer")
    code, out = train_in_process(stdlib_dataset, run_dir, "--train.steps=15", "--optim.lr=1e-3")
    assert code == 0 and [m["step"] for m in metrics(run_dir) if "loss" in m] == list(range(1, 16))
    assert "optim.lr is 0.001 in this run, 0.003 in the checkpoint: 0.001 applies from step 11" in caplog.text
    lr = {m["step"]: m["lr"] for m in metrics(run_dir) if "lr" in m}
    changed = OptimConfig(lr=1e-3, warmup_steps=5, schedule="constant")  # as COMMON sets them, with the new peak
    # the lr a line shows is the one its step's update used: step 11 is 0-based update 10, the first of the resume
    assert lr[11] == pytest.approx(1e-3 * lr_factor(10, optim=changed, total_steps=15), rel=1e-9)
