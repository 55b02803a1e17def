"""benchmarks/gpu.sh works before a GPU is ever lent: its --smoke mode, end to end on CPU."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys


from helpers import driver_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINE = re.compile(r"^tiny\s+(torchrun|ray-train|sft-sdpa)\s+tokens/s\s+([\d,]+)\s+MFU\s+([\d.]+)%\s+peak\s+([\d.]+) GiB$")


def test_gpu_script_smoke_prints_one_line_per_launcher(local_ray, tmp_path):
    """Run from another directory, as a person might: dataprep, then the tiny preset under torchrun and under Ray
    Train (on the session's Ray, through RAY_ADDRESS), then fine-tuned on chat data cut from the same corpus; stdout
    is exactly one result line per run."""
    env = {**driver_env(local_ray.get_runtime_context().gcs_address), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", "out"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    matches = [LINE.match(line) for line in proc.stdout.splitlines()]
    assert all(matches) and [m[1] for m in matches] == ["torchrun", "ray-train", "sft-sdpa"], proc.stdout
    assert all(int(m[2].replace(",", "")) > 0 and float(m[3]) > 0 for m in matches), proc.stdout
    out = tmp_path / "out"
    assert (out / "data-seq64" / "manifest.json").exists()
    assert json.loads((out / "chat-seq64" / "manifest.json").read_text())["chat"]["template"] == "raylm-chat-v1"
    for launcher in ("torchrun", "ray-train", "sft-sdpa"):
        assert (out / "runs" / f"tiny-{launcher}" / "metrics.jsonl").exists()
        assert not (out / "runs" / f"tiny-{launcher}" / "checkpoints").exists()
