"""Tools on a multi-node Ray (`multinode`: a head with 0 CPUs and two 1-CPU worker nodes): the work spreads over
the nodes, survives losing one, and the result is the bytes of a one-node run."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from conftest import driver_env, jsonl_corpus, run_captured
from dataprep.__main__ import main
from test_dataprep import dataset_files

pytestmark = pytest.mark.ray
UNITS = 96
"""Enough work (~5 s) that the second node's actor, which may start seconds after the first, gets units too."""


@pytest.fixture(scope="module")
def corpus_and_one_node_bytes(local_ray, tmp_path_factory) -> tuple[list[str], dict]:
    """(dataprep arguments of a corpus of UNITS units, the dataset files the session's one-node Ray makes of it)."""
    root = tmp_path_factory.mktemp("multinode")
    jsonl_corpus(root / "corpus", files=UNITS, lines=25)
    args = ["--input", str(root / "corpus"), "--vocab-size", "400", "--seq-len", "16", "--pack.unit_mb=0.008"]
    assert run_captured(main, [*args, "--output", root / "one"])[0] == 0
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
    deadline = time.time() + 120
    while not list((tmp_path / "lost" / "_progress").glob("unit-*.json")) and driver.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    multinode.remove_node(next(iter(multinode.worker_nodes)), allow_graceful=False)
    assert not (tmp_path / "lost" / "manifest.json").exists(), "the node went after the run had finished"
    out, err = driver.communicate(timeout=300)
    multinode.add_node(num_cpus=1)
    assert driver.returncode == 0, err[-3000:]
    assert dataset_files(tmp_path / "lost") == one_node


def test_elastic_training_starts_with_the_one_worker_slot_left(multinode, stdlib_dataset, tmp_path):
    """--ray.min_workers=1 --ray.num_workers=2 with one of the two worker nodes gone: Ray Train starts the run on
    the one worker it can place, and it finishes. The node is added back for the tests after this one."""
    from test_trainer import TINY, metrics

    multinode.remove_node(next(iter(multinode.worker_nodes)), allow_graceful=True)
    try:
        run_dir = str(tmp_path / "elastic")
        proc = subprocess.run([sys.executable, "-m", "trainer", *TINY, "--data.path", stdlib_dataset, "--run.dir",
                               run_dir, "--train.steps=4", "--train.log_every=2", "--checkpoint.every=0",
                               "--ray.min_workers=1", "--ray.num_workers=2"],
                              env=driver_env(multinode.address), capture_output=True, text=True, timeout=300)
    finally:
        multinode.add_node(num_cpus=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(m["step"], m["workers"]) for m in metrics(run_dir) if "loss" in m] == [(2, 1), (4, 1)]
