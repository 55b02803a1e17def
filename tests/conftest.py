"""Session fixtures every test reuses: a real moto S3 server over HTTP, a local Ray with 2 CPUs, small corpora."""

from __future__ import annotations

import gzip
import json
import logging
import os

import pytest

BUCKET = "raylm-test"

# Local test clusters need no token auth; set before any Ray import starts a cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


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
    """A local Ray with 2 CPUs, started after the S3 environment so its workers inherit it."""
    import ray

    ray.init(num_cpus=2, logging_level=logging.WARNING, log_to_driver=False)  # with the dashboard, as users run it
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def multinode(s3_server):
    """A multi-node Ray on this machine (`ray.cluster_utils.Cluster`): a head with 0 CPUs, where drivers and Train
    controllers live (never remove it), and two worker nodes of 1 CPU each that a test may remove and add back.

    The test process stays connected to the session's `local_ray`; drivers run as subprocesses with
    `RAY_ADDRESS=cluster.address` (see `driver_env`). The cluster has its own temp dir and ports, is stopped by PID
    at the end of the module, and the machine's "current cluster" record is put back as it was.
    """
    import tempfile

    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    from trainer.train import free_port

    record = get_ray_address_file(None)
    saved = open(record).read() if os.path.exists(record) else None
    fast_death = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}  # a lost node in 2 s
    os.environ.update(fast_death)  # read by the cluster's processes as they start
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": free_port(), "dashboard_port": free_port(),
        "temp_dir": tempfile.mkdtemp(prefix="rl-mn-", dir="/tmp")})
    for name in fast_death:
        del os.environ[name]
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()
    if saved is not None:
        with open(record, "w") as f:
            f.write(saved)
    elif os.path.exists(record):
        os.remove(record)


def driver_env(address: str) -> dict:
    """Environment of a subprocess driver joining the Ray at `address` (one thread per process, as on 2 cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": address}


def upload_dir(local_dir, url: str) -> None:
    """Copy a local directory tree to an s3:// prefix."""
    from raylm import storage

    for root, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(url, rel), f.read())


MIXED_DOCS = {
    "notes/a.txt": "Hello world.\nSecond line, with  two spaces and a tab\there.\n",
    "notes/cjk.md": "# 标题\n\n日本語のテキストと한국어 문장. Emoji: 🎉🚀👩‍💻 and the marker ▁ itself.\n",
    "code/mod.py": "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n    pass\n",
    "code/empty.py": "",
}
JSONL_DOCS = [f"json document {i}: the quick brown fox {'jumps ' * (i % 7)}over the lazy dog {i}." for i in range(40)]
PARQUET_DOCS = [f"parquet row {i} — naïve café résumé, 数字 {i * 17}" for i in range(30)]


def write_mixed_corpus(root) -> list[str]:
    """A small corpus of every supported format; returns its documents in raylm's corpus order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = {}
    for rel, text in MIXED_DOCS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if text:
            docs[str(path)] = [text]
    lines = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(JSONL_DOCS))
    (root / "data").mkdir()
    (root / "data" / "part1.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    docs[str(root / "data" / "part1.jsonl.gz")] = JSONL_DOCS
    (root / "data" / "part2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    docs[str(root / "data" / "part2.jsonl.zst")] = JSONL_DOCS
    pq.write_table(pa.table({"text": PARQUET_DOCS}), root / "data" / "rows.parquet")
    docs[str(root / "data" / "rows.parquet")] = PARQUET_DOCS
    (root / "data" / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    return [d for path in sorted(docs) for d in docs[path]]


def jsonl_corpus(root, files: int, lines: int) -> None:
    """`files` .jsonl files of `lines` short documents each, made of a few words (a quick tokenizer's corpus)."""
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain forest ocean".split()
    root.mkdir()
    for f in range(files):
        docs = (f"doc {f}.{i}: " + " ".join(words[(f + i * k) % len(words)] for k in range(40)) for i in range(lines))
        (root / f"part-{f:03d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


@pytest.fixture
def mixed_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    return root, write_mixed_corpus(root)


def run_captured(main, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of an in-process CLI run under `run_cli`.

    Plain StringIO buffers instead of capsys: Ray binds log handlers to the sys.stderr current when it sets them
    up, and capsys closes its buffer when the test ends, so a later Ray log line would hit a closed file.
    """
    import contextlib
    import io

    from raylm.cli import run_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(main, [str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def stdlib_dataset(local_ray, tmp_path_factory) -> str:
    """A small real dataset: 150 stdlib files, 1000-token vocabulary, 64-token sequences."""
    from dataprep.__main__ import main

    out = tmp_path_factory.mktemp("datasets") / "stdlib"
    code, _, err = run_captured(main, ["--max-files", "150", "--vocab-size", "1000", "--seq-len", "64",
                                       "--val-fraction", "0.05", "--output", out])
    assert code == 0, err
    return str(out)


@pytest.fixture(scope="session")
def s3_stdlib_dataset(stdlib_dataset, s3_server) -> str:
    url = f"{s3_server}/datasets/stdlib"
    upload_dir(stdlib_dataset, url)
    return url
