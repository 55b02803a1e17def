"""One dataprep run per output: a second run (with or without --overwrite) stops with one line naming the holder, and
an --overwrite that takes over from a run presumed dead leaves a manifest whose every shard is there, whatever that
run's straggler does when it is finally stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

from dataprep.__main__ import main
from helpers import jsonl_corpus, run_captured, wait_for
from raylm import storage
from raylm.dataset import open_dataset
from raylm.lease import LEASE

ARGS = ["--workers.local=true", "--vocab-size", "400", "--seq-len", "16", "--pack.unit_mb=0.008", "--shard-size",
        "0.001"]
"""~60 units of several shards each, packed in the driver (no Ray: the lease is the point here)."""


def start(corpus, output) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dataprep", "--input", str(corpus), "--output", str(output), *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_a_second_run_on_an_output_stops_naming_the_holder(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "ds"
    jsonl_corpus(corpus, files=60, lines=25)
    first = start(corpus, out)
    try:
        # its record written whole (a stop in the middle of the write leaves no holder to name), renewed every 15 s
        wait_for("the first run's lease", lambda: (out / LEASE).exists() and (out / LEASE).stat().st_size > 0,
                 first, timeout=120)
        first.send_signal(signal.SIGSTOP)  # it holds the output, renewed or not, for 60 s
        for extra in ([], ["--overwrite"]):
            code, _, err = run_captured(main, ["--input", corpus, "--output", out, *ARGS, *extra])
            assert code == 2 and len(errors(err)) == 1 and "Traceback" not in err, err[-3000:]
            assert errors(err)[0].startswith(f"error: dataset output {out} is held by job dataprep (host "), err
            assert f"pid {first.pid})" in errors(err)[0] and "another --output" in errors(err)[0]
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
        if first.poll() is None:
            first.kill()
    ds = open_dataset(str(out))
    assert len(ds.train) == ds.manifest["splits"]["train"]["rows"] > 0
    assert not (out / LEASE).exists()


def test_overwrite_beside_a_straggler_on_s3_leaves_every_shard_of_its_manifest(tmp_path, s3_server):
    """Run 1 is paused mid-run (its driver is the straggler, as behind a partition) until its lease counts as
    lapsed; run 2 with --overwrite takes the output over and finishes. Then run 1 is interrupted (SIGINT: it aborts
    the unit it was packing) and let go: it deletes none of run 2's shards and cleans nothing up, and stops with
    one line saying it lost the output. Every shard run 2's manifest names is there at its recorded size, and reads."""
    corpus, out = tmp_path / "corpus", f"{s3_server}/datasets/contested-{uuid.uuid4().hex[:6]}"
    jsonl_corpus(corpus, files=60, lines=25)
    straggler = start(corpus, out)
    try:
        wait_for("a committed unit", lambda: storage.exists(f"{out}/_progress/unit-000001.json"), straggler,
                 timeout=180)
        straggler.send_signal(signal.SIGSTOP)
        record = json.loads(storage.read_bytes(f"{out}/{LEASE}"))
        record["expires"] = time.time() - 1  # as if its 60 s had passed without a renewal
        storage.write_bytes(f"{out}/{LEASE}", json.dumps(record).encode())
        code, _, err = run_captured(main, ["--input", corpus, "--output", out, *ARGS, "--overwrite"])
        assert code == 0, err[-3000:]
        straggler.send_signal(signal.SIGINT)
        straggler.send_signal(signal.SIGCONT)
        straggler.wait(timeout=120)
    finally:
        straggler.send_signal(signal.SIGCONT)
        if straggler.poll() is None:
            straggler.kill()
    manifest = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            assert storage.size(f"{out}/{shard['file']}") == shard["bytes"], shard
    ds = open_dataset(out)
    assert ds.train.rows(range(len(ds.train))).shape == (manifest["splits"]["train"]["rows"], 17)
    err = straggler.stderr.read()
    assert straggler.returncode == 2 and len(errors(err)) == 1, err[-3000:]
    assert f"dataset output {out} is now held by " in errors(err)[0], err[-3000:]  # run 2 has released it since
    assert json.loads(storage.read_bytes(f"{out}/{LEASE}"))["released"]  # kept: it fences run 1
