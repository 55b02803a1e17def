"""One job per run directory: the lease protocol on a local run directory and on S3 (moto), the race of two jobs
starting at the same instant, the commit check that keeps a job whose lease was taken over from writing or
committing, and the loader that never takes a checkpoint committed under a lost lease."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid

import pytest

from helpers import ON_S3, wait_for
from raylm import storage
from raylm.lease import LEASE, Lease, LeaseLost, RunDirBusy, check_held, held
from raylm.ray_session import free_port


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
    with caplog.at_level(logging.WARNING, logger="raylm.lease"):
        with held(str(tmp_path), job="ray job 0b000000", seconds=60) as lease:
            assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.token
            check_held(str(tmp_path), lease.token)
    assert "taking over" in caplog.text and "presumed dead" in caplog.text
    assert "from job ray job 0a000000" in caplog.text
    assert not (tmp_path / LEASE).exists()  # released at the end (the old lease had no generation to fence)


def test_renewal_notices_a_takeover_and_the_commit_check_refuses(tmp_path):
    lost = threading.Event()
    lease = Lease(str(tmp_path), job="ray job 0b000000", seconds=4).acquire(on_lost=lost.set)
    first = json.loads((tmp_path / LEASE).read_text())
    wait_for("a renewal", lambda: json.loads((tmp_path / LEASE).read_text())["expires"] > first["expires"],
             timeout=20, every=0.02)
    write_holder(tmp_path, token="new", job="ray job 0c000000")
    assert lost.wait(10) and "job ray job 0c000000" in lease.lost
    with pytest.raises(LeaseLost, match="now held by job ray job 0c000000"):
        check_held(str(tmp_path), lease.token)
    lease.close()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "new"  # the new holder's lease stays


def race(run_dir: str) -> list:
    """Two acquires released at the same instant: each one's Lease, or the RunDirBusy it raised."""
    barrier, outcome = threading.Barrier(2), [None, None]

    def take(i: int) -> None:
        lease = Lease(run_dir, job=f"job {i}", seconds=60)
        barrier.wait()
        try:
            outcome[i] = lease.acquire()
        except RunDirBusy as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


@pytest.fixture(params=["local", ON_S3])
def store(request, tmp_path):
    """A place for run directories: a local folder, or moto's S3 over HTTP."""
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_server')}/leases-{uuid.uuid4().hex[:6]}"
    return str(tmp_path)


def test_two_jobs_starting_at_the_same_instant_never_both_win(store):
    """50 races, each on a fresh run directory and on one taken over from a dead holder: exactly one acquire wins,
    the other names it; the lease on the store is the winner's."""
    assert storage.conditional_writes(storage.join(store, "x", LEASE))
    for i in range(50):
        run_dir = storage.join(store, f"run-{i}")
        if i % 2:  # a dead holder's lease to take over: both racers see it expired and try If-Match on it
            storage.write_bytes(storage.join(run_dir, LEASE), json.dumps(
                {"token": "dead", "job": "j", "host": "h", "pid": 1, "renewed": 0, "expires": 1,
                 "generation": 1, "committed": -1, "fenced": {}}).encode())
        outcome = race(run_dir)
        winners = [o for o in outcome if isinstance(o, Lease)]
        assert len(winners) == 1, (i, outcome)
        loser = next(o for o in outcome if isinstance(o, RunDirBusy))
        assert f"is held by job {winners[0].me['job']}" in str(loser), (i, str(loser))
        assert json.loads(storage.read_bytes(storage.join(run_dir, LEASE)))["token"] == winners[0].token
        winners[0].close()


def test_a_job_that_cannot_renew_for_lease_s_stops_itself(s3_server, monkeypatch):
    """Storage unreachable (the endpoint stops answering): after `seconds` without a renewal the job declares its
    lease lost itself (another job may have taken it over meanwhile)."""
    lost = threading.Event()
    lease = Lease(f"{s3_server}/unreachable-{uuid.uuid4().hex[:6]}", job="ray job 0b000000",
                  seconds=2).acquire(on_lost=lost.set)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    assert lost.wait(30), "the job never stopped"
    assert time.monotonic() - started >= 2 - 0.5  # not before lease_s without a renewal
    assert "could not renew its lease" in lease.lost and "for 2s" in lease.lost
    lease.close()


def test_a_job_whose_lease_was_taken_over_never_writes_again_and_its_stale_commits_are_never_loaded(store, caplog):
    """Job A commits step 1, then stops renewing (a partitioned driver) until its lease lapses; job B takes over.
    A's next save writes no step directory at all (checked on the store). A commit A made after the takeover (as
    a store without conditional writes, or an older raylm, lets a stale job make it) is skipped by the loader and
    refused by name; B writes under names of its own generation, and its checkpoints are the ones loaded."""
    import torch
    import torch.distributed as dist

    from trainer.checkpoint import (COMMITTED, TRAIN_STATE, CheckpointConfig, Checkpointer, latest_committed,
                                    list_checkpoints, resolve, step_dir)

    run_dir = storage.join(store, "run")
    own_group = not dist.is_initialized()  # an in-process run of the trainer before may have left its one-rank group
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        config = CheckpointConfig(async_save=False, keep=5)
        a = Lease(run_dir, job="ray job 0a000000", seconds=1).acquire()
        ckpt_a = Checkpointer(run_dir, config, rank=0, device=torch.device("cpu"), lease=a.token)
        ckpt_a.save(1, model, optimizer, {"step": 1})
        a._stop.set()  # partitioned: no more renewals
        a._thread.join()
        wait_for("A's lease to lapse", lambda: time.time() > json.loads(storage.read_bytes(a.path))["expires"],
                 timeout=20, every=0.02)
        b = Lease(run_dir, job="ray job 0c000000", seconds=60).acquire()
        with pytest.raises(LeaseLost, match="now held by job ray job 0c000000"):
            ckpt_a.save(2, model, optimizer, {"step": 2})
        assert [step for step, _, _ in list_checkpoints(run_dir)] == [1]  # no step directory written
        stale = step_dir(run_dir, 2)  # what a stale job on a store without conditional writes could leave
        ckpt_a._write({"model": model.state_dict()}, stale)
        storage.write_bytes(storage.join(stale, TRAIN_STATE), json.dumps(
            {"step": 2, "lease": {"token": a.token, "generation": 1}}).encode())
        storage.write_bytes(storage.join(stale, COMMITTED), b"2\n")
        with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
            assert latest_committed(run_dir) == step_dir(run_dir, 1)
        assert f"skipping {stale}: its job had lost the run directory's lease" in caplog.text
        with pytest.raises(Exception, match="had lost the run directory's lease"):
            resolve(stale)
        ckpt_b = Checkpointer(run_dir, config, rank=0, device=torch.device("cpu"), lease=b.token)
        ckpt_b.save(2, model, optimizer, {"step": 2})
        assert latest_committed(run_dir) == step_dir(run_dir, 2, "-g2")
        assert [(s, p.rsplit("/", 1)[1], ok) for s, p, ok in list_checkpoints(run_dir)] == [
            (1, "step-000001", True), (2, "step-000002", False), (2, "step-000002-g2", True)]
        for ckpt in (ckpt_a, ckpt_b):
            ckpt.close()
        b.close()
        record = json.loads(storage.read_bytes(storage.join(run_dir, LEASE)))
        assert record["released"] and record["fenced"] == {"1": 1}  # kept: the fence outlives B
        assert latest_committed(run_dir) == step_dir(run_dir, 2, "-g2")
    finally:
        if own_group:
            dist.destroy_process_group()


def test_a_lease_being_renewed_is_never_read_as_held_by_nobody(tmp_path):
    """A job checks its lease without the lock (check_held, before each save or unit commit) while its renewal
    thread rewrites it: every read sees a whole record, never an empty or cut file (which reads as "held by
    nobody" and stopped a dataprep run on a healthy lease)."""
    lease = Lease(str(tmp_path), job="ray job 0c000000", seconds=4).acquire(on_lost=lambda: None)
    path = str(tmp_path / LEASE)
    stop, seen = threading.Event(), []

    def renew_again_and_again():
        while not stop.is_set():
            record, version = storage.read_versioned(path)
            storage.write_if(path, json.dumps({**json.loads(record), "renewed": time.time()}).encode(),
                             version=version)

    writer = threading.Thread(target=renew_again_and_again)
    writer.start()
    try:
        for _ in range(2000):
            check_held(str(tmp_path), lease.token, what="dataset output")
            seen.append(len((tmp_path / LEASE).read_bytes()))
    finally:
        stop.set()
        writer.join()
        lease.close()
    assert min(seen) > 0
