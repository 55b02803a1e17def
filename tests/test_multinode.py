"""Tools on a multi-node Ray (`multinode`: a head with 0 CPUs and two 1-CPU worker nodes) with runs on moto S3: the
work spreads over the nodes; a training run lives through a preemption notice, a lost node and the node's return
with the losses of an undisturbed run; one job holds a run directory; storage never guesses; a Tune study spreads
its trials over the nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

from dataprep.__main__ import main
from helpers import (STUDY, TINY, dataset_files, driver_env, jsonl_corpus, logged_steps, losses, metrics,
                     run_captured, wait_for, within)
from raylm import storage
from trainer.checkpoint import list_checkpoints

UNITS = 96
"""Enough work (~5 s) that the second node's actor, which may start seconds after the first, gets units too."""


@pytest.fixture(scope="module")
def corpus_and_one_node_bytes(tmp_path_factory) -> tuple[list[str], dict]:
    """(dataprep arguments of a corpus of UNITS units, the dataset files one process makes of it: the bytes of
    the one-node Ray path, tests/test_dataprep_local.py, in seconds instead of a Ray Data run)."""
    root = tmp_path_factory.mktemp("multinode")
    jsonl_corpus(root / "corpus", files=UNITS, lines=25)
    args = ["--input", str(root / "corpus"), "--vocab-size", "400", "--seq-len", "16", "--pack.unit_mb=0.008",
            "--storage.shared_fs=true"]  # the test cluster's nodes share this machine's disk
    assert run_captured(main, [*args, "--output", root / "one", "--workers.local=true"])[0] == 0
    return args, dataset_files(root / "one")


def dataprep_driver(args: list[str], output, cluster) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dataprep", *args, "--output", str(output)],
                            env=driver_env(cluster.address), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_dataprep_units_run_on_both_nodes_and_match_one_node(multinode, corpus_and_one_node_bytes, tmp_path):
    args, one_node = corpus_and_one_node_bytes
    out, err = (driver := dataprep_driver(args, tmp_path / "multi", multinode)).communicate(timeout=300)
    assert driver.returncode == 0, err[-3000:]
    by_node = dict(re.findall(r"(\w{8}) x (\d+)", out.split("units by node: ")[1].splitlines()[0]))
    workers = {node.node_id[:8] for node in multinode.worker_nodes}
    assert set(by_node) == workers and sum(map(int, by_node.values())) == UNITS, out
    assert dataset_files(tmp_path / "multi") == one_node


def test_dataprep_survives_losing_a_worker_node(multinode, corpus_and_one_node_bytes, tmp_path):
    """A worker node removed without notice mid-run: Ray Data reruns its unit on the surviving node, and the
    result is the bytes of an undisturbed run. The node is added back for the tests after this one."""
    args, one_node = corpus_and_one_node_bytes
    driver = dataprep_driver(args, tmp_path / "lost", multinode)
    wait_for("a committed unit", lambda: any((tmp_path / "lost" / "_progress").glob("unit-*.json")), driver,
             timeout=120, every=0.02)
    multinode.remove_node(next(iter(multinode.worker_nodes)), allow_graceful=False)
    assert not (tmp_path / "lost" / "manifest.json").exists(), "the node went after the run had finished"
    out, err = driver.communicate(timeout=300)
    multinode.add_node(num_cpus=1)
    assert driver.returncode == 0, err[-3000:]
    assert dataset_files(tmp_path / "lost") == one_node



# ------------------------------------------------------------------------------------------- a run on spot capacity
SPOT_STEPS = 110
SPOT = [*TINY, f"--train.steps={SPOT_STEPS}", "--train.log_every=1", "--train.eval_every=0", "--checkpoint.every=8"]
ELASTIC = ["--ray.num_workers=2", "--ray.min_workers=1", "--ray.resize_check_s=1", "--fault.step_delay_s=0.25"]
"""Two workers, one per node, that may shrink to one. Ray sees a node come back within 20 s (its autoscaling
coordinator's tick): steps slowed to ~0.35 s keep the run going until then, whenever the tick comes."""


class Driver:
    """`python -m trainer` as a user runs it against the cluster, its output collected as it comes."""

    def __init__(self, cluster, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], env=driver_env(cluster.address),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 300) -> str:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return self.output


def train_worker_pids(cluster) -> list[int]:
    """PIDs of the Ray Train workers running on the cluster's worker nodes (descendants of their raylets)."""
    raylets = {node.all_processes["raylet"][0].process.pid for node in cluster.worker_nodes}
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"RayTrainWorker" not in f.read():
                    continue
        except OSError:
            continue
        pid = int(entry)
        while pid > 1 and pid not in raylets:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                break
        if pid in raylets:
            found.append(int(entry))
    return found


@dataclass
class SpotRun:
    run_dir: str
    output: str = ""
    exit_code: int | None = None
    signalled_at_step: int = 0
    second_job: subprocess.CompletedProcess | None = None
    reference: list[float] = field(default_factory=list)


@pytest.fixture(scope="module")
def spot_run(multinode, s3_stdlib_dataset, s3_server, tmp_path_factory) -> SpotRun:
    """One training run through what spot capacity does to it, on two nodes with RUN_DIR on S3: a second job
    tries the same run directory (while the first starts its workers); a worker gets SIGTERM (a preemption notice);
    after the resumed run has gone on, a worker node is removed without notice, and once the run goes on with one
    worker the node comes back.
    Also the losses of the same run undisturbed (one process, no Ray): any world size gives the same ones."""
    run = SpotRun(run_dir=f"{s3_server}/runs/spot-{uuid.uuid4().hex[:6]}")
    args = [*SPOT, "--data.path", s3_stdlib_dataset, "--run.dir", run.run_dir]
    log = tmp_path_factory.mktemp("spot") / "reference.log"
    with open(log, "w") as out:  # the reference trains while the Ray run's steps mostly wait out fault.step_delay_s
        reference = subprocess.Popen([sys.executable, "-m", "trainer", "--no-ray", *args[:-1],
                                      f"{run.run_dir}-reference"], stdout=out, stderr=subprocess.STDOUT)
    driver = Driver(multinode, *args, *ELASTIC)
    try:
        wait_for("the lease", lambda: storage.exists(f"{run.run_dir}/lease.json"), driver.proc)
        run.second_job = subprocess.run([sys.executable, "-m", "trainer", *args, *ELASTIC],
                                        env=driver_env(multinode.address), capture_output=True, text=True, timeout=120)
        wait_for("step 3", lambda: len(logged_steps(run.run_dir)) >= 3, driver.proc)
        run.signalled_at_step = logged_steps(run.run_dir)[-1]["step"]
        os.kill(train_worker_pids(multinode)[0], signal.SIGTERM)
        wait_for("the resume after the preemption save", lambda: "resumed from" in driver.output, driver.proc)
        resumed = int(re.search(r"resumed from \S+step-(\d+)", driver.output)[1])
        wait_for("two steps after the resume", lambda: logged_steps(run.run_dir)[-1]["step"] >= resumed + 2,
                 driver.proc)
        multinode.remove_node(next(iter(multinode.worker_nodes)), allow_graceful=False)
        wait_for("a step on one worker", lambda: logged_steps(run.run_dir)[-1]["workers"] == 1, driver.proc)
        multinode.add_node(num_cpus=1)
        run.output = driver.finish()
        run.exit_code = driver.proc.returncode
    finally:
        if driver.proc.poll() is None:
            driver.proc.kill()
        while len(multinode.worker_nodes) < 2:
            multinode.add_node(num_cpus=1)
        reference.wait(timeout=300)
    assert reference.returncode == 0, log.read_text()[-3000:]
    run.reference = losses(f"{run.run_dir}-reference")
    return run


def test_a_second_job_on_the_run_directory_stops_naming_the_holder(spot_run):
    second = spot_run.second_job
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
    assert f"run directory {spot_run.run_dir} is held by job ray job" in errors[0], errors
    assert "Traceback" not in second.stderr


def test_a_preemption_notice_saves_the_step_and_the_run_resumes_from_it(spot_run):
    """SIGTERM to one worker: the run commits a checkpoint at the step the notice lands in, or the next one for a
    notice after that step's last backward or between steps (not at checkpoint.every), inside the grace period, and
    Ray's restart resumes from exactly that checkpoint. The bound allows for the logged steps read here lagging the
    loop (tests/test_preemption.py pins the step exactly)."""
    out = spot_run.output
    assert spot_run.exit_code == 0, out[-5000:]
    notice = re.search(r"preemption notice: checkpoint at step (\d+) committed ([\d.]+)s after it \(grace 25s\)", out)
    assert notice, out[-5000:]
    saved, seconds = int(notice[1]), float(notice[2])
    assert spot_run.signalled_at_step < saved <= spot_run.signalled_at_step + 3 and seconds < 25, out[-5000:]
    assert re.search(rf"resumed from \S+/checkpoints/step-{saved:06d} at step {saved} \(saved by 2 workers, now 2\)",
                     out), out[-5000:]


def test_a_lost_node_shrinks_the_run_and_its_return_grows_it_with_the_same_losses(spot_run):
    """The node removed without notice: the run goes on by itself with one worker from the newest committed
    checkpoint, grows back to two when the node returns, and every step's loss is the undisturbed run's."""
    assert spot_run.exit_code == 0, spot_run.output[-5000:]
    steps = logged_steps(spot_run.run_dir)
    assert [m["step"] for m in steps] == list(range(1, SPOT_STEPS + 1))
    sizes = [m["workers"] for m in steps]
    assert [w for i, w in enumerate(sizes) if i == 0 or w != sizes[i - 1]] == [2, 1, 2], sizes
    assert within([m["loss"] for m in steps], spot_run.reference)
    vals = [m["val_loss"] for m in metrics(spot_run.run_dir) if "val_loss" in m]
    assert vals[-1] < vals[0] - 1.0, vals  # ln(1000) ≈ 6.9 at step 0: the model learns through it all
    assert storage.exists(f"{spot_run.run_dir}/checkpoints/step-{SPOT_STEPS:06d}/COMMITTED")
    assert not storage.exists(f"{spot_run.run_dir}/lease.json")  # released at the end


def test_a_job_whose_lease_is_taken_over_stops_and_never_commits_again(multinode, s3_stdlib_dataset, s3_server):
    """A job presumed dead: its driver is paused (as behind a network partition) until its lease lapses, and a new
    job takes the run directory over, fencing the old job at its newest commit. The old job's workers go on
    training but write no step directory but the one in flight at the takeover and commit nothing more (rank 0
    checks the lease before each save and marks each commit in it, a compare-and-swap), and once resumed the old
    driver stops with one line naming the new holder."""
    from raylm.lease import Lease

    run_dir = f"{s3_server}/runs/taken-{uuid.uuid4().hex[:6]}"
    driver = Driver(multinode, *TINY, "--data.path", s3_stdlib_dataset, "--run.dir", run_dir, "--train.steps=200",
                    "--train.log_every=1", "--checkpoint.every=1", "--ray.num_workers=1", "--run.lease_s=4",
                    "--ray.max_failures=0")
    newer = None
    lease = lambda: json.loads(storage.read_bytes(f"{run_dir}/lease.json"))  # noqa: E731
    try:
        wait_for("a committed checkpoint", lambda: any(ok for *_, ok in list_checkpoints(run_dir)), driver.proc)
        os.kill(driver.proc.pid, signal.SIGSTOP)  # no more renewals
        wait_for("the lease to lapse", lambda: time.time() > lease()["expires"], driver.proc)
        newer = Lease(run_dir, job="ray job 0f000000", seconds=60).acquire()  # takes over: the old one looks dead
        os.kill(driver.proc.pid, signal.SIGCONT)  # its workers trained on meanwhile, and go on until it stops them
        out = driver.finish(timeout=120)
    finally:
        if driver.proc.poll() is None:
            os.kill(driver.proc.pid, signal.SIGCONT)
            driver.proc.kill()
        if newer is not None:
            newer.close()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert driver.proc.returncode == 2 and len(errors) == 1 and "ray job 0f000000" in errors[0], out[-5000:]
    fence = lease()["fenced"]["1"]  # the old job's newest commit while it held the lease
    found = [(step, ok) for step, _, ok in list_checkpoints(run_dir)]
    assert max(step for step, ok in found if ok) == fence, found
    assert all(step <= fence + 1 for step, _ in found), (fence, found)  # at most the save in flight at the takeover
    assert len(logged_steps(run_dir)) < 200


def test_local_paths_on_a_cluster_of_several_nodes_are_refused(multinode, s3_stdlib_dataset, tmp_path):
    """Each node has its own disk: a local path is one line naming it, before any worker starts, in the trainer as
    in dataprep. (With --storage.shared_fs=true they are accepted: the dataprep tests above run so, the test
    cluster's nodes sharing this machine's disk.)"""
    run_dir = tmp_path / "run"
    runs = {"--run.dir": ["trainer", *TINY, "--data.path", s3_stdlib_dataset, "--run.dir", str(run_dir)],
            "--output.dir": ["dataprep", "--input", f"{s3_stdlib_dataset}/manifest.json", "--output", str(run_dir)]}
    procs = {flag: subprocess.Popen([sys.executable, "-m", *args], env=driver_env(multinode.address),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for flag, args in runs.items()}  # both at once: each is mostly its imports
    for flag, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in stderr and errors == [
            f"error: {flag} {run_dir} is a local path, but this Ray cluster has 3 nodes, each with its own disk: use "
            f"an s3:// URL, or --storage.shared_fs=true if {run_dir} is on a filesystem every node mounts (NFS)"], \
            stderr[-3000:]
    assert not run_dir.exists()


def train_workers_by_node(cluster) -> dict[str, str]:
    """Ray Train worker actor id -> node id, of every worker the cluster has run (the State API keeps dead ones)."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.head_node.address_info["webui_url"], limit=10_000, detail=True,
                         filters=[("class_name", "=", "RayTrainWorker")], raise_on_missing_output=False)
    return {actor.actor_id: actor.node_id for actor in actors}


def test_a_random_study_spreads_over_the_nodes_stops_poor_trials_and_its_best_config_trains(multinode,
                                                                                               s3_stdlib_dataset,
                                                                                               s3_server):
    """Six trials of one worker each, two at a time (one per worker node), searched on a μP proxy of half the width;
    ASHA stops some at a mark; trials with batch sizes 8 and 12 and a budget that divides neither validate, stop and
    complete at exactly the same token counts; results.csv/png and best.toml go to S3, and the config the study's
    printed command names reads back from there with the best trial's values at the configured width."""
    import csv
    import io

    from raylm.config import load_config
    from trainer.job import JobConfig

    before = train_workers_by_node(multinode)
    tune_dir = f"{s3_server}/studies/{uuid.uuid4().hex[:6]}"
    proc = subprocess.run([sys.executable, "-m", "tune", *STUDY, "--data.path", s3_stdlib_dataset, "--tune.dir",
                           tune_dir, "--tune.samples=6", "--tune.lr=1e-4:3e-2", "--tune.batch=8,12",
                           "--tune.budget_tokens=13000", "--model.mup_base_dim=32", "--tune.proxy_dim=32"],
                          env=driver_env(multinode.address), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    trial_nodes = {node for actor, node in train_workers_by_node(multinode).items() if actor not in before}
    assert trial_nodes == {node.node_id for node in multinode.worker_nodes}, trial_nodes
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{tune_dir}/results.csv").decode())))
    assert len(rows) == 6 and {r["status"] for r in rows} <= {"completed", "stopped early", "diverged"}
    assert any(r["status"] == "stopped early" for r in rows), rows  # ASHA cut at least one trial at a mark
    completed = [r for r in rows if r["status"] == "completed"]
    mark = 2 * 24 * 64  # 13000 / 4 marks, cut to whole steps of both batches: a multiple of lcm(8, 12) × seq_len 64
    assert {r["global_batch"] for r in rows} == {"8", "12"}, rows
    assert completed and all(int(r["tokens"]) == 4 * mark for r in completed)  # equal tokens, not equal steps
    assert all(int(r["tokens"]) in (mark, 2 * mark, 3 * mark) for r in rows if r["status"] == "stopped early")
    for trial in storage.list_dirs(f"{tune_dir}/trials"):  # every validation of every trial at the same counts
        evals = [m["tokens"] for m in metrics(trial) if "val_loss" in m]
        assert evals == [k * mark for k in range(len(evals))], (trial, evals)
        assert load_config(JobConfig, storage.join(trial, "config.toml"), []).model.dim == 32  # the proxy
    best = min(completed, key=lambda r: float(r["final_val_loss"]))
    assert f"lr {float(best['lr']):.3g}, global batch {best['global_batch']}" in proc.stdout
    png = storage.read_bytes(f"{tune_dir}/results.png")
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    command = proc.stdout.strip().splitlines()[-1].split("train with it: ")[1].split()  # as the study prints it
    assert command[:4] == ["python", "-m", "trainer", "--config"] and command[4] == f"{tune_dir}/best.toml", command
    tuned = load_config(JobConfig, command[4], [])  # what the trainer reads first, from S3
    assert (tuned.optim.lr, tuned.train.global_batch) == (float(best["lr"]), int(best["global_batch"]))
    assert (tuned.model.dim, tuned.model.n_heads, tuned.model.mup_base_dim) == (64, 4, 32)  # the configured width
    assert storage.read_bytes(command[4]).decode().startswith("# optim.lr and train.global_batch are the best of a "
                                                              "study at proxy width 32")
    assert tuned.run.dir == f"{tune_dir}/best-run" and tuned.data.path == [s3_stdlib_dataset]
