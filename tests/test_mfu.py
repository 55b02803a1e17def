"""MFU's peak: on CPU the best matmul peak this machine has given (so a run that starts while the machine is busy
does not move MFU), and in gpu.sh one peak for every line (so equal tokens/s are equal MFU on every side)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.gpu_report import report_line
from trainer.metrics import best_peak, cpu_key, device_peak_flops, peak_cache_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path / "cache"))
    return peak_cache_path()


def test_a_busy_run_keeps_the_best_peak_of_this_machine_and_thread_count(cache):
    assert best_peak(100e9) == 100e9 and best_peak(40e9) == 100e9  # a measurement under load does not lower it
    assert best_peak(120e9) == 120e9 and best_peak(90e9) == 120e9  # a better one raises it
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert best_peak(30e9) == 30e9  # another thread count is another peak
    finally:
        torch.set_num_threads(threads)
    with open(cache) as f:
        assert json.load(f)[cpu_key()] == 120e9


def test_the_cpu_peak_of_a_run_is_the_cached_best(cache):
    """What the trainer divides by: a real measurement, then the best of this machine (an impossibly fast one
    written here stands for a quiet moment before)."""
    best_peak(1e18)
    assert device_peak_flops(torch.device("cpu")) == 1e18


def test_an_unwritable_cache_gives_this_runs_measurement(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path / "file" / "raylm"))
    assert best_peak(5e9) == 5e9 and "cannot cache the CPU peak" in caplog.text


def rows(tokens_per_s: float, mfu: float) -> list[dict]:
    return [{"tokens_per_s": tokens_per_s, "mfu": mfu, "workers": 1, "peak_mem_gib": 0.1}] * 3


def test_gpu_sh_lines_divide_by_one_peak():
    """The smoke's two sides, as measured (tokens/s equal, each run's MFU against its own worker's threads: a Ray
    Train worker has 1 thread, the torchrun process every core): the same MFU against the benchmark's one peak."""
    torchrun, ray = rows(2000.0, 0.108), rows(2000.0, 0.201)
    assert report_line(torchrun, preset="tiny", launcher="x") != report_line(ray, preset="tiny", launcher="x")
    shared = {"flops_per_token": 5e6, "peak_flops": 100e9}
    line = report_line(torchrun, preset="tiny", launcher="x", **shared)
    assert line == report_line(ray, preset="tiny", launcher="x", **shared) and "MFU  10.0%" in line
