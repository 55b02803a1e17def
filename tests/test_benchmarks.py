"""benchmarks/gpu.sh works before a GPU is ever lent: its --smoke mode, end to end on CPU, with Ray and on a bare
box (no Ray, raylm not installed), and the flex check's comparison catching attention across examples."""

from __future__ import annotations

import copy
import json
import pathlib
import re
import subprocess
import sys
import sysconfig

import pytest
import torch

from helpers import driver_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"^(\S+)\s+(\S+)\s+tokens/s\s+([\d,]+)\s+MFU\s+([\d.]+)%\s+peak\s+([\d.]+) GiB$")
CHECK = re.compile(r"^(\S+)\s+(.+?)\s+(PASS|FAIL|SKIP)  (.+)$")


def run_smoke(tmp_path, env: dict) -> subprocess.CompletedProcess:
    """gpu.sh --smoke from another directory than the checkout, as a person might run it."""
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", "out"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def check_lines(stdout: str) -> list[str]:
    """Each stdout line as `NAME LAUNCHER` (a figure, checked positive) or `CHECK` (checked PASS); any other line
    fails the test."""
    seen = []
    for line in stdout.splitlines():
        figure, check = FIGURE.match(line), CHECK.match(line)
        assert figure or (check and check[3] == "PASS"), f"not a figure or a PASS: {line!r}\n{stdout}"
        if figure:
            assert int(figure[3].replace(",", "")) > 0 and float(figure[4]) > 0, line
        seen.append(f"{figure[1]} {figure[2]}" if figure else check[1])
    return seen


def assert_outputs(out: pathlib.Path, launchers: list[str]) -> None:
    assert (out / "data-seq64" / "manifest.json").exists()
    assert json.loads((out / "chat-seq64" / "manifest.json").read_text())["chat"]["template"] == "raylm-chat-v1"
    assert json.loads((out / "eval-tiny.json").read_text())["datasets"]["data-seq64"]["bpb"] > 0
    for run in [f"tiny-{launcher}" for launcher in launchers] + ["tiny-sft-sdpa", "moe-torchrun", "tiny-preempt"]:
        assert (out / "runs" / run / "metrics.jsonl").exists(), run
        assert not (out / "runs" / run / "checkpoints").exists(), run


def test_gpu_script_smoke_with_ray(local_ray, tmp_path):
    """With Ray (the session's, through RAY_ADDRESS) and raylm installed: dataprep on Ray Data, the tiny preset
    under torchrun (with its default sample) and Ray Train, the flex check, chat fine-tuning, MoE, eval and the
    preemption, one line each."""
    env = {**driver_env(local_ray.get_runtime_context().gcs_address), "PYTHON": sys.executable}
    proc = run_smoke(tmp_path, env)
    assert check_lines(proc.stdout) == ["tiny torchrun", "sample", "tiny ray-train", "flex", "tiny sft-sdpa",
                                        "moe torchrun", "eval", "preempt"], proc.stdout
    assert "bare-box" not in proc.stderr
    assert_outputs(tmp_path / "out", ["torchrun", "ray-train"])


def bare_python(tmp_path) -> str:
    """A Python with this one's packages but without raylm installed: a venv whose .pth file adds the
    site-packages (its own .pth files, raylm's editable finder among them, are not processed from there)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    pathlib.Path(own, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.heavy
def test_gpu_script_smoke_on_a_bare_box(tmp_path):
    """No Ray and no TensorBoard (packages that raise ImportError, first on PYTHONPATH) and raylm not installed:
    the Ray half is skipped with one line on stderr, dataprep runs in the driver, every other check still passes."""
    hidden = tmp_path / "hidden"
    for name in ("ray", "tensorboard"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this box')\n")
    env = {**driver_env(""), "PYTHON": bare_python(tmp_path), "PYTHONPATH": str(hidden)}
    del env["RAY_ADDRESS"]
    proc = run_smoke(tmp_path, env)
    assert check_lines(proc.stdout) == ["tiny torchrun", "sample", "flex", "tiny sft-sdpa", "moe torchrun", "eval",
                                        "preempt"], proc.stdout
    bare = [line for line in proc.stderr.splitlines() if "Ray half" in line]
    assert len(bare) == 1 and "ray does not import and raylm is not installed" in bare[0], proc.stderr
    assert "units by node: local x" in (tmp_path / "out" / "logs" / "dataprep.log").read_text()
    assert "tensorboard is not installed" in (tmp_path / "out" / "logs" / "tiny-torchrun.log").read_text()
    assert_outputs(tmp_path / "out", ["torchrun"])


@pytest.mark.parametrize("leak", [False, True])
def test_flex_check_sees_attention_across_examples(leak, monkeypatch):
    """The flex check's comparison on CPU (fp32 forward; the backward through SDPA's dense mask): equal within
    1e-4 when packing is right, far apart when examples of a row may attend to each other."""
    import trainer.model.transformer as model
    from benchmarks.gpu_checks import TOLERANCE, packed_vs_alone, small_model

    if leak:
        causal = model.block_causal_mask
        monkeypatch.setattr(model, "block_causal_mask", lambda seg, flex: causal(torch.zeros_like(seg), flex=flex))
    flex, alone = small_model(torch.device("cpu"), torch.float32, seq_len=64)
    examples = [torch.randint(512, (n,), generator=torch.Generator().manual_seed(n)) for n in (13, 22, 9, 20)]
    logits_err, _ = packed_vs_alone(flex, alone, examples, backward=False)
    sdpa = copy.deepcopy(alone)
    sdpa.cfg.attention = "sdpa"
    _, grad_err = packed_vs_alone(sdpa, alone, examples, backward=True)
    tol = TOLERANCE["torch.float32"]
    assert (logits_err > 0.1 and grad_err > 0.1) if leak else (logits_err < tol and grad_err < tol)
