"""Several raylm commands on one machine, each on a Ray of its own, never join, starve or hang each other; a cluster
that does not answer, or a worker group that finds no room, is one line, not a wait without end."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import TINY, wait_for
from raylm.ray_session import free_port, starts_its_own_cluster
from trainer.checkpoint import list_checkpoints

DATA = ["--max-files", "40", "--vocab-size", "1000", "--seq-len", "64", "--val-fraction", "0.1"]


def command(env: dict, *args: str) -> subprocess.Popen:
    """A raylm command as a user starts it in a terminal of its own (one thread, as on 2 cores)."""
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A small dataset made without Ray."""
    out = tmp_path_factory.mktemp("ray-session") / "data"
    proc = subprocess.run([sys.executable, "-m", "dataprep", "--workers.local=true", *DATA, "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


@pytest.mark.parametrize("where", ["RAY_ADDRESS", "record"])
def test_a_cluster_that_does_not_answer_is_one_line_within_seconds(where, tmp_path, monkeypatch):
    """RAY_ADDRESS, or the record a dead `ray start` head left, names an address nobody answers at: the command
    stops with one line naming it (ray.init would wait about a minute, deaf to SIGTERM, then print a traceback),
    and no Ray is started. The way on that a stale record's line gives (RAY_ADDRESS=local) passes the record by."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    address = f"127.0.0.1:{free_port()}"
    env["RAY_TMPDIR"] = str(tmp_path)
    if where == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    else:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(address)
    proc = subprocess.run([sys.executable, "-m", "dataprep", *DATA, "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [proc.stderr.splitlines()[-1]]
    assert proc.stderr.startswith("error: ") and address in proc.stderr and "does not answer" in proc.stderr
    if where == "record":
        record = tmp_path / "ray" / "ray_current_cluster"
        assert proc.stderr.startswith(f"error: the Ray cluster at {address}, named by {record} (left by a `ray start` "
                                      "on this machine), does not answer (Connection refused): "), proc.stderr
        assert "delete the record" in proc.stderr and proc.stderr.rstrip().endswith(
            "or set RAY_ADDRESS=local to run on a local Ray of this command's own"), proc.stderr
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
        monkeypatch.setenv("RAY_ADDRESS", "local")
        assert starts_its_own_cluster()
    assert not list(tmp_path.glob("ray/session_*"))


def test_a_study_beside_a_training_run_completes(own_ray_env, dataset, tmp_path):
    """A 3-trial Tune study (more trials than its Ray of 2 CPUs holds at once: the workers' placement groups of
    the trials that end or that ASHA stops must be freed for the next one) in one terminal, a training run in another,
    each on a local Ray of its own on this 2-core machine."""
    train = command(own_ray_env, "trainer", *TINY, "--data.path", dataset, "--run.dir", str(tmp_path / "run"),
                    "--train.steps=40", "--ray.num_workers=1", "--ray.start_timeout_s=120")
    study = command(own_ray_env, "tune", *TINY, "--data.path", dataset, "--tune.dir", str(tmp_path / "study"),
                    "--tune.batch=8", "--tune.lr=1e-4,1e-3,3e-3", "--tune.budget_tokens=5120", "--tune.marks=2",
                    "--ray.num_workers=1", "--ray.start_timeout_s=120")
    code, out, err = finish(study)
    assert code == 0, out[-2000:] + err[-3000:]
    assert len(re.findall(r"^trial .*: (completed|stopped early)", out, re.M)) == 3, out
    code, out, err = finish(train)
    assert code == 0 and "finished;" in out, err[-3000:]


def test_an_eval_started_during_training_outlives_it(own_ray_env, dataset, tmp_path):
    """`trainer.eval` of a run still training (as the README suggests) runs on a Ray of its own: the training run
    ends, and takes its Ray down, while the evaluation is under way, which still finishes with its figures."""
    run = tmp_path / "run"
    train = command(own_ray_env, "trainer", *TINY, "--data.path", dataset, "--run.dir", str(run),
                    "--train.steps=400", "--checkpoint.every=5", "--checkpoint.keep=1000", "--ray.num_workers=1")
    wait_for("a committed checkpoint", lambda: bool(list_checkpoints(str(run))), train)
    eval_tmp = pathlib.Path(tempfile.mkdtemp(prefix="rl-ev-", dir="/tmp"))  # Ray's socket paths stay short
    evaluate = command({**own_ray_env, "RAY_TMPDIR": str(eval_tmp)}, "trainer.eval", "--checkpoint", str(run),
                       "--data.path", dataset, "--out", str(tmp_path / "eval.json"))
    try:
        wait_for("the evaluation's own Ray", lambda: any(eval_tmp.glob("ray/session_*/logs/raylet.out")), evaluate)
    except AssertionError:
        raise AssertionError(finish(evaluate)[2][-3000:]) from None
    os.kill(train.pid, signal.SIGINT)  # Ctrl-C: the run stops, its Ray goes down with it
    code, _, err = finish(train)
    assert code == 130, err[-3000:]
    assert evaluate.poll() is None, "the evaluation ended before the training run: nothing was shown"
    code, out, err = finish(evaluate)
    assert code == 0 and "bits/byte" in out, err[-3000:]


NO_ROOM = ("the run's 4 workers (1 CPU each) found no room to start in 5 s: 4 CPU wanted, the cluster has 2, 2 free; "
           "lower --ray.num_workers or --ray.cpus_per_worker, free the cluster, or raise --ray.start_timeout_s")


@pytest.mark.parametrize("tool", ["trainer", "tune"])
def test_workers_that_find_no_room_stop_the_run_with_one_line(tool, own_ray_env, dataset, tmp_path):
    """4 workers of 1 CPU on a Ray of 2 CPUs: the run (or the study's trial) stops after --ray.start_timeout_s with
    one line saying what it wanted and what the cluster has (Ray Train alone retries every minute for ever, printing
    nothing)."""
    where = (["--run.dir", str(tmp_path / "run")] if tool == "trainer" else
             ["--tune.dir", str(tmp_path / "study"), "--tune.batch=8", "--tune.lr=1e-3", "--tune.budget_tokens=20480"])
    start = time.monotonic()
    proc = command(own_ray_env, tool, *TINY, "--data.path", dataset, *where, "--ray.num_workers=4",
                   "--ray.start_timeout_s=5")
    code, out, err = finish(proc, timeout=240)
    assert code == 2, out[-2000:] + err[-3000:]
    if tool == "trainer":
        assert err.splitlines() == [f"error: {NO_ROOM}"]
        raylet = next(pathlib.Path(own_ray_env["RAY_TMPDIR"]).glob("ray/session_*/logs/raylet.out"))
        assert "] (raylet) " in raylet.read_text()  # a quiet console, and Ray's own log files as Ray writes them
    else:
        assert [line for line in out.splitlines() if line.endswith(f": failed: {NO_ROOM}")], out
        assert "Traceback" not in err, err[-3000:]
    assert time.monotonic() - start < 5 + 120  # Ray's start-up and a retry at most, never Ray's minute-long rounds


def test_what_holds_names_the_placement_group_and_its_driver(local_ray):
    """The one line's account of a full cluster: each placement group holding the resource, with the job (driver
    pid and command) that made it, as `ray status` would show."""
    from ray.util import placement_group, remove_placement_group

    from trainer.ray_launch import what_holds

    pg = placement_group([{"CPU": 1}] * 2)
    local_ray.get(pg.ready(), timeout=60)
    try:
        line = what_holds({"CPU": 1}, 2)
    finally:
        remove_placement_group(pg)
    assert line.startswith("2 CPU wanted, the cluster has 2, 0 free, held 2 by placement group "
                           f"{pg.id.hex()[:8]} of job {local_ray.get_runtime_context().get_job_id()} (pid {os.getpid()}: ")
