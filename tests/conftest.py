"""Fixtures: a real moto S3 server over HTTP, a local Ray with 2 CPUs, a multi-node Ray, small corpora.

A test's tier follows from its fixtures (`pytest_collection_modifyitems`): one that starts Ray or moto, or commands
that start a Ray of their own, is `slow`, and so is one marked `heavy` (tens of seconds of multi-process or compiled
training without either); `pytest -m "not slow"` is the fast tier (config, model, HF parity, data order, storage,
errors, the in-process loop, checkpoints, muP and evaluation on datasets written without Ray) and starts neither."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest

from helpers import preference_task, run_captured, upload_dir, write_mixed_corpus
from raylm.ray_session import free_port

BUCKET = "raylm-test"

# Local test clusters need no token auth; set before any Ray import starts a cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# The trainer keeps the best CPU matmul peak per machine; tests (and their subprocesses) keep theirs apart from the
# user's ~/.cache/raylm.
os.environ.setdefault("RAYLM_CACHE_DIR", tempfile.mkdtemp(prefix="raylm-test-cache-"))


MARKS = {"s3_server": ("s3", "slow"), "local_ray": ("ray", "slow"), "multinode": ("ray", "slow"),
         "own_ray_env": ("ray", "slow"), "head": ("ray", "slow"), "mocked_aws_env": ("s3", "slow")}
"""Fixture -> the markers of every test that uses it, directly or through another fixture."""


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: tens of seconds on 2 cores (several processes, compiles, a long "
                                       "training run) without Ray or moto; in the slow tier")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in set(item.fixturenames) & set(MARKS):
            for mark in MARKS[fixture]:
                item.add_marker(mark)
        if item.get_closest_marker("heavy"):
            item.add_marker("slow")


@pytest.fixture
def own_ray_env():
    """The environment of commands that start a local Ray of their own (as on a newcomer's machine): not the
    session's, and in a temp dir of its own so it never mixes with the test clusters' State API."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return {**env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rl-own-", dir="/tmp")}


@pytest.fixture
def mocked_aws_env(tmp_path):
    """The environment of a process that mocks AWS in itself (moto's `mock_aws`), with a home of its own (a new key
    pair goes to ~/.ssh) and not the session's S3 server."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    return {**env, "HOME": str(tmp_path), "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on 127.0.0.1, reached over HTTP by pyarrow/s3fs through the standard AWS environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """A local Ray with 2 CPUs, started after the S3 environment so its workers inherit it, and its own address
    (as raylm's commands give theirs) and temp dir (test sessions side by side each have one): inside it, Ray Train's placement-group cleaner never scans the machine, where
    other test sessions' clusters may run. The test process's environment is left as it was."""
    import ray
    from ray._private.services import get_node_ip_address

    port = free_port()
    own = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}
    before = {name: os.environ.get(name) for name in own}
    os.environ.update(own)  # read by the cluster's processes as they start
    try:  # with the dashboard, as users run it
        ray.init(address="local", num_cpus=2, logging_level=logging.WARNING, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="rl-s-", dir="/tmp"))
    finally:
        for name, value in before.items():
            os.environ.pop(name) if value is None else os.environ.update({name: value})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def multinode(local_ray, s3_server):
    """A multi-node Ray on this machine (`ray.cluster_utils.Cluster`): a head with 0 CPUs, where drivers and Train
    controllers live (never remove it), and two worker nodes of 1 CPU each that a test may remove and add back.

    The test process stays connected to the session's `local_ray`; drivers run as subprocesses with
    `RAY_ADDRESS=cluster.address` (see `driver_env`). The cluster has its own temp dir and ports, is stopped by PID
    at the end of the module, and the machine's "current cluster" record is put back as it was. Its processes, and
    those of nodes added later, see `CLUSTER_ENV`.
    """
    import tempfile

    from ray._private.services import get_node_ip_address
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    record = get_ray_address_file(None)
    saved = open(record).read() if os.path.exists(record) else None
    made = not os.path.isdir(os.path.dirname(record))
    os.makedirs(os.path.dirname(record), exist_ok=True)  # Cluster writes the record there; a fresh machine has none
    port = free_port()
    env = {**CLUSTER_ENV, "RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # read by the cluster's processes as they start
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": port, "dashboard_port": free_port(),
        "temp_dir": tempfile.mkdtemp(prefix="rl-mn-", dir="/tmp")})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()
    for name, value in before.items():
        os.environ.pop(name) if value is None else os.environ.update({name: value})
    if saved is not None:
        with open(record, "w") as f:
            f.write(saved)
    elif os.path.exists(record):
        os.remove(record)
    if made and not os.listdir(os.path.dirname(record)):
        os.rmdir(os.path.dirname(record))


CLUSTER_ENV = {
    "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4",  # a lost node is seen in 2 s
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",  # cluster/README.md: a restart that asks for a lost node's slot
}
"""The multi-node cluster's settings (RAY_ADDRESS is added: with the session's Ray also on this machine, a process
that looks for "its" cluster would otherwise scan the machine for every one, each time)."""


@pytest.fixture
def mixed_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    return root, write_mixed_corpus(root)


@pytest.fixture(scope="session")
def stdlib_dataset(tmp_path_factory) -> str:
    """A small real dataset: 150 stdlib files, 1000-token vocabulary, 64-token sequences. Written by dataprep in
    this process (`--workers.local=true`: no Ray, no moto), to the bytes the Ray path writes
    (tests/test_dataprep_local.py), so the tests that read it stay in the fast tier."""
    from dataprep.__main__ import main

    out = tmp_path_factory.mktemp("datasets") / "stdlib"
    code, _, err = run_captured(main, ["--max-files", "150", "--vocab-size", "1000", "--seq-len", "64",
                                       "--val-fraction", "0.05", "--workers.local=true", "--output", out])
    assert code == 0, err
    return str(out)


@pytest.fixture(scope="session")
def s3_stdlib_dataset(stdlib_dataset, s3_server) -> str:
    url = f"{s3_server}/datasets/stdlib"
    upload_dir(stdlib_dataset, url)
    return url


@pytest.fixture(scope="session")
def pairs_data(tmp_path_factory) -> dict[str, str]:
    """A text dataset (the tokenizer) and a preference dataset of 700 pairs in rows of 129 positions (about two
    pairs a row: two reference parts of train rows), and another of the same pairs split otherwise; made in-process
    without Ray."""
    from dataprep.__main__ import main as dataprep

    root = tmp_path_factory.mktemp("pairs")
    preference_task(root, sft=0, pairs=700, held_out=10)
    local = "--workers.local=true"
    code, _, err = run_captured(dataprep, ["--input", root / "corpus", "--output", root / "text", "--vocab-size",
                                           "320", "--seq-len", "64", local])
    assert code == 0, err
    for name, val in (("pref", "0.1"), ("other", "0.2")):
        code, _, err = run_captured(dataprep, ["--format", "preference", "--input", root / "pairs", "--tokenizer",
                                               root / "text", "--output", root / name, "--seq-len", "128",
                                               "--val-fraction", val, local])
        assert code == 0, err
    return {"text": str(root / "text"), "pref": str(root / "pref"), "other": str(root / "other")}
