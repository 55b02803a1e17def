"""`python -m dataprep --workers.local=true`: the tokenizer trained and every unit packed in the driver, with no Ray
import at all (a GPU box without Ray), to the bytes the Ray path writes."""

from __future__ import annotations

import os
import subprocess
import sys

from dataprep.__main__ import main
from helpers import dataset_files, run_captured
from raylm.dataset import open_dataset

STDLIB_20 = ["--max-files", "20", "--vocab-size", "512", "--seq-len", "64", "--val-fraction", "0.2",
             "--pack.unit_mb=0.1", "--shard-size", "0.1"]
"""The demo corpus's first 20 files, cut into several units whose train rows fill several shards, with a val
split."""


def test_local_mode_runs_without_ray_and_a_rerun_is_a_no_op(tmp_path):
    """With a `ray` package that raises on import first on PYTHONPATH: the dataset opens, its counts add up, the
    summary names no Ray node; the same command again does nothing."""
    hidden = tmp_path / "hidden" / "ray"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    out = tmp_path / "ds"
    command = [sys.executable, "-m", "dataprep", "--workers.local=true", *STDLIB_20, "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{hidden.parent}:{os.environ.get('PYTHONPATH', '')}"}
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "units by node: local x" in first.stdout
    ds = open_dataset(str(out))
    m = ds.manifest
    assert m["units"] >= 3 and m["tokenizer"]["trained"] and m["tokenizer"]["vocab_size"] == 512
    assert m["row_len"] == 65 and ds.train[0].shape == (65,) and m["splits"]["val"]["rows"] > 0
    for split in ("train", "val"):
        entry = m["splits"][split]
        assert entry["tokens"] == entry["rows"] * m["row_len"] + entry["dropped_tokens"]
    train = m["splits"]["train"]["shards"]
    assert len(train) > len({s["unit"] for s in train})  # units wrote several shards
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_local_mode_writes_the_bytes_of_the_ray_path(local_ray, tmp_path):
    """Tokenizer, shards, sources and manifest: byte for byte the same in the driver as on Ray Data's actors."""
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    code, _, err = run_captured(main, [*STDLIB_20, "--output", on_ray])
    assert code == 0, err
    code, out, err = run_captured(main, [*STDLIB_20, "--output", local, "--workers.local=true"])
    assert code == 0 and "units by node: local x" in out, err
    files = dataset_files(on_ray)
    assert len([name for name in files if name.endswith(".arrow")]) > 4
    assert dataset_files(local) == files
