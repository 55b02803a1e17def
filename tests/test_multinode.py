"""Tools on a multi-node Ray (`multinode`: a head with 0 CPUs and two 1-CPU worker nodes): the work spreads over
the nodes and the result is the bytes of a one-node run."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from conftest import driver_env, jsonl_corpus, run_captured
from dataprep.__main__ import main

pytestmark = pytest.mark.ray


def test_dataprep_units_run_on_both_nodes_and_match_one_node(local_ray, multinode, tmp_path):
    from test_dataprep import dataset_files

    jsonl_corpus(tmp_path / "corpus", files=24, lines=25)
    args = ["--input", str(tmp_path / "corpus"), "--vocab-size", "400", "--seq-len", "16", "--pack.unit_mb=0.008"]
    proc = subprocess.run([sys.executable, "-m", "dataprep", *args, "--output", str(tmp_path / "multi")],
                          env=driver_env(multinode.address), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_node = dict(re.findall(r"(\w{8}) x (\d+)", proc.stdout.split("units by node: ")[1].splitlines()[0]))
    workers = {node.node_id[:8] for node in multinode.worker_nodes}
    assert set(by_node) == workers and sum(map(int, by_node.values())) == 24, proc.stdout
    assert run_captured(main, [*args, "--output", tmp_path / "one"])[0] == 0  # the session's one-node Ray
    assert dataset_files(tmp_path / "multi") == dataset_files(tmp_path / "one")


def test_dataprep_survives_losing_a_worker_node(local_ray, multinode, tmp_path):
    """A worker node removed without notice mid-run: Ray Data reruns its unit on the surviving node, and the
    result is the bytes of an undisturbed run. The node is added back for the tests after this one."""
    from test_dataprep import dataset_files

    jsonl_corpus(tmp_path / "corpus", files=40, lines=25)
    args = ["--input", str(tmp_path / "corpus"), "--vocab-size", "400", "--seq-len", "16", "--pack.unit_mb=0.008"]
    driver = subprocess.Popen([sys.executable, "-m", "dataprep", *args, "--output", str(tmp_path / "lost")],
                              env=driver_env(multinode.address), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "lost" / "_progress").glob("unit-*.json")) and driver.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    multinode.remove_node(next(iter(multinode.worker_nodes)), allow_graceful=False)
    assert not (tmp_path / "lost" / "manifest.json").exists(), "the node went after the run had finished"
    out, err = driver.communicate(timeout=300)
    multinode.add_node(num_cpus=1)
    assert driver.returncode == 0, err[-3000:]
    assert run_captured(main, [*args, "--output", tmp_path / "one"])[0] == 0
    assert dataset_files(tmp_path / "lost") == dataset_files(tmp_path / "one")
