"""Input listing (files, directories, globs and s3:// prefixes resolve to the same sorted, keyed file lists), and
storage that never guesses: the SDK's region, no bucket ever created."""

from __future__ import annotations

import pytest

from helpers import run_captured, upload_dir
from raylm import storage
from raylm.errors import DataError, StorageError


def make_tree(root):
    for rel in ["a/x.txt", "a/b/y.jsonl.gz", "a/b/z.parquet", "c.md"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def keys(entries):
    return [e.key for e in entries]


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "t")


def test_local_file_dir_and_glob(tree):
    assert keys(storage.list_files(str(tree))) == ["a/b/y.jsonl.gz", "a/b/z.parquet", "a/x.txt", "c.md"]
    [single] = storage.list_files(str(tree / "a" / "x.txt"))
    assert single.named and single.key == "x.txt" and single.size == len("a/x.txt")
    assert keys(storage.list_files(str(tree / "a" / "**" / "*.jsonl*"))) == ["b/y.jsonl.gz"]
    assert keys(storage.list_files(str(tree / "*.md"))) == ["c.md"]
    with pytest.raises(DataError, match="does not exist"):
        storage.list_files(str(tree / "missing"))
    with pytest.raises(DataError, match="matches no files"):
        storage.list_files(str(tree / "*.rst"))


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for rel in ["a.txt", "b.txt", "c.md", "x/a.txt", "x/y/a.txt", "y/x.txt", "z/x.txt", "z/w/x.txt"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_glob_wildcards_stay_inside_one_folder(corpus):
    assert keys(storage.list_files(str(corpus / "*.txt"))) == ["a.txt", "b.txt"]
    assert keys(storage.list_files(str(corpus / "*"))) == ["a.txt", "b.txt", "c.md"]
    assert keys(storage.list_files(str(corpus / "x" / "*a*"))) == ["a.txt"]


def test_globstar_spans_zero_or_more_folders(corpus):
    assert keys(storage.list_files(str(corpus / "**" / "a.txt"))) == ["a.txt", "x/a.txt", "x/y/a.txt"]
    assert keys(storage.list_files(str(corpus / "**" / "y" / "*.txt"))) == ["x/y/a.txt", "y/x.txt"]
    assert keys(storage.list_files(str(corpus / "x" / "**"))) == ["a.txt", "y/a.txt"]
    assert len(storage.list_files(str(corpus / "**"))) == 8


def test_question_mark_and_brackets(corpus):
    assert keys(storage.list_files(str(corpus / "?.txt"))) == ["a.txt", "b.txt"]
    assert keys(storage.list_files(str(corpus / "[ab].*"))) == ["a.txt", "b.txt"]
    assert keys(storage.list_files(str(corpus / "[!a].*"))) == ["b.txt", "c.md"]
    with pytest.raises(DataError, match="matches no files"):
        storage.list_files(str(corpus / "??.txt"))


def test_wildcard_in_a_folder_component(corpus):
    entries = storage.list_files(str(corpus / "*" / "x.txt"))
    assert keys(entries) == ["y/x.txt", "z/x.txt"]
    assert [e.path for e in entries] == [str(corpus / "y" / "x.txt"), str(corpus / "z" / "x.txt")]
    assert keys(storage.list_files(str(corpus / "[xz]" / "*" / "*.txt"))) == ["x/y/a.txt", "z/w/x.txt"]


def test_s3_prefix_and_glob_give_the_same_keys(tree, s3_server):
    url = f"{s3_server}/listing"
    upload_dir(tree, url)
    assert keys(storage.list_files(url + "/")) == keys(storage.list_files(str(tree)))
    assert keys(storage.list_files(url + "/a/**/*.parquet")) == ["b/z.parquet"]
    assert keys(storage.list_files(url + "/*/x.txt")) == ["a/x.txt"]
    assert keys(storage.list_files(url + "/*")) == ["c.md"]
    [single] = storage.list_files(url + "/c.md")
    assert single.named and single.path == url + "/c.md"
    assert storage.read_bytes(url + "/a/x.txt") == b"a/x.txt"


def test_wildcards_skip_hidden_names_unless_the_pattern_spells_the_dot(tmp_path):
    for rel in ("a.py", ".hidden.py", ".venv/lib/x.py", "pkg/b.py", "pkg/.cache/c.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    keys = lambda pattern: [e.key for e in storage.list_files(f"{tmp_path}/{pattern}")]  # noqa: E731
    assert keys("**/*.py") == ["a.py", "pkg/b.py"]
    assert keys("*.py") == ["a.py"] and keys(".*.py") == [".hidden.py"]
    assert keys(".venv/**/*.py") == ["lib/x.py"]


def region_seen(env: dict) -> str:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    code = "from raylm import storage; print(storage.filesystem('s3://bucket/key')[0].region)"
    proc = subprocess.run([sys.executable, "-c", code], env={**clean, "AWS_EC2_METADATA_DISABLED": "true", **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_region_is_the_aws_sdks_own_resolution(tmp_path):
    """No region of raylm's: the SDK reads it from the environment, else from the profile's config file."""
    config = tmp_path / "config"
    config.write_text("[default]\nregion = ap-south-1\n[profile eu]\nregion = eu-central-1\n")
    assert region_seen({"AWS_REGION": "eu-west-3", "AWS_CONFIG_FILE": str(config)}) == "eu-west-3"
    assert region_seen({"AWS_CONFIG_FILE": str(config)}) == "ap-south-1"
    assert region_seen({"AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "eu"}) == "eu-central-1"


def test_a_missing_bucket_is_named_and_never_created(s3_server):
    import boto3

    with pytest.raises(StorageError) as caught:
        storage.check_bucket("s3://no-such-bucket/runs/a")
    assert "bucket no-such-bucket (of s3://no-such-bucket/runs/a) does not exist" in str(caught.value)
    with pytest.raises(OSError):
        storage.write_bytes("s3://no-such-bucket/runs/a/x", b"x")
    storage.check_bucket(f"{s3_server}/anything/below")  # an existing bucket, an absent prefix: fine
    for main, args in cli_runs_into_a_missing_bucket(s3_server):  # each tool, before any compute
        code, out, err = run_captured(main, args)
        assert code == 2 and err.strip().splitlines() == [f"error: {caught.value}".replace("runs/a", "out")], err
    buckets = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert "no-such-bucket" not in buckets


def cli_runs_into_a_missing_bucket(s3_server: str) -> list:
    from dataprep.__main__ import main as dataprep
    from trainer.__main__ import main as trainer
    from tune.__main__ import main as tune

    return [(dataprep, ["--input", f"{s3_server}/corpus", "--output", "s3://no-such-bucket/out"]),
            (trainer, ["--data.path", f"{s3_server}/datasets/x", "--run.dir", "s3://no-such-bucket/out"]),
            (tune, ["--data.path", f"{s3_server}/datasets/x", "--tune.dir", "s3://no-such-bucket/out"])]


def test_a_local_record_locked_by_a_stopped_writer_is_an_error_not_a_hang(tmp_path):
    """A process stopped while it holds a local record's lock (here: the same file locked through another open
    file, as another process holds it) makes the next writer stop with one line naming the file, not wait for
    ever."""
    import fcntl
    import os
    import time

    path = tmp_path / "lease.json"
    path.write_bytes(b"{}")
    holder = os.open(path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    waiter = os.open(path, os.O_RDWR)
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=f"{path} has been locked by another process for 0.2 s"):
            storage.lock_within(waiter, str(path), 0.2)
        assert time.monotonic() - t0 < 5
        fcntl.flock(holder, fcntl.LOCK_UN)
        storage.lock_within(waiter, str(path), 0.2)  # free again: taken at once
    finally:
        os.close(holder)
        os.close(waiter)
