"""One job per run directory: the lease protocol on a local run directory (the same code runs on s3://; the
multi-node tests run it there), and the commit check that keeps a job whose lease was taken over from committing."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from trainer.lease import LEASE, Lease, LeaseLost, RunDirBusy, check_held, held


def write_holder(run_dir, **fields) -> None:
    now = time.time()
    holder = {"token": "other", "job": "ray job 0a000000", "host": "node-b", "pid": 4242, "renewed": now,
              "expires": now + 60, **fields}
    (run_dir / LEASE).write_text(json.dumps(holder))


def test_a_live_holder_keeps_the_run_dir_and_is_named(tmp_path):
    write_holder(tmp_path)
    with pytest.raises(RunDirBusy) as caught:
        Lease(str(tmp_path), job="ray job 0b000000", seconds=60).acquire()
    message = str(caught.value)
    assert "is held by job ray job 0a000000 (host node-b, pid 4242)" in message and "\n" not in message
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "other"  # untouched


@pytest.mark.parametrize("stale", [{"expires": time.time() - 1, "renewed": time.time() - 61},
                                   {"host": socket.gethostname(), "pid": 2**22 + 1}],
                         ids=["expired", "holder-process-gone-from-this-host"])
def test_a_dead_holder_is_taken_over_with_a_log_line(tmp_path, caplog, stale):
    write_holder(tmp_path, **stale)
    with caplog.at_level(logging.WARNING, logger="trainer.lease"):
        with held(str(tmp_path), job="ray job 0b000000", seconds=60) as lease:
            assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.token
            check_held(str(tmp_path), lease.token)
    assert "taking over" in caplog.text and "presumed dead" in caplog.text
    assert "from job ray job 0a000000" in caplog.text
    assert not (tmp_path / LEASE).exists()  # released at the end


def test_renewal_notices_a_takeover_and_the_commit_check_refuses(tmp_path):
    lost = []
    lease = Lease(str(tmp_path), job="ray job 0b000000", seconds=4).acquire(on_lost=lambda: lost.append(True))
    first = json.loads((tmp_path / LEASE).read_text())
    time.sleep(1.5)  # one renewal (every seconds / 4)
    assert json.loads((tmp_path / LEASE).read_text())["expires"] > first["expires"]
    write_holder(tmp_path, token="new", job="ray job 0c000000")
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "job ray job 0c000000" in lease.lost
    with pytest.raises(LeaseLost, match="now held by job ray job 0c000000"):
        check_held(str(tmp_path), lease.token)
    lease.close()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "new"  # the new holder's lease stays


def test_a_job_whose_lease_was_taken_over_never_commits(tmp_path):
    """The check at the commit itself (rank 0, before COMMITTED is written), for a job presumed dead that still runs:
    the checkpoint's shards may be written, but it is never committed, so no later job takes it as complete."""
    import torch
    import torch.distributed as dist

    from helpers import free_port
    from trainer.checkpoint import CheckpointConfig, Checkpointer, list_checkpoints

    own_group = not dist.is_initialized()  # an in-process run of the trainer before may have left its one-rank group
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        with held(str(tmp_path), job="ray job 0b000000", seconds=60) as lease:
            ckpt = Checkpointer(str(tmp_path), CheckpointConfig(async_save=False), rank=0, device=torch.device("cpu"),
                                lease=lease.token)
            ckpt.save(1, model, optimizer, {"step": 1})
            write_holder(tmp_path, token="new", job="ray job 0c000000")
            with pytest.raises(LeaseLost, match="now held by job ray job 0c000000"):
                ckpt.save(2, model, optimizer, {"step": 2})
            ckpt.close()
        assert [(step, committed) for step, _, committed in list_checkpoints(str(tmp_path))] == [(1, True), (2, False)]
    finally:
        if own_group:
            dist.destroy_process_group()
