"""Where a log step's metrics go: one stdout line, metrics.jsonl, TensorBoard, Ray Train, Ray's Prometheus gauges.

Also the hardware peak that MFU divides by: a table for known GPUs; on CPU, the dense fp32 matmul FLOP/s of this
very process, measured once at start (so MFU is against what this machine can actually do).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from raylm import storage

log = logging.getLogger(__name__)

GPU_PEAK_BF16 = {  # dense bf16 tensor-core FLOP/s per device
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}
GAUGES = {"loss": "raylm_loss", "val_loss": "raylm_val_loss", "tokens_per_s": "raylm_tokens_per_second",
          "mfu": "raylm_mfu", "data_wait_share": "raylm_data_wait_share",
          "checkpoint_blocked_s": "raylm_checkpoint_blocked_seconds", "workers": "raylm_workers", "step": "raylm_step"}
"""Ray's Prometheus gauges of rank 0's log steps (exported as ray_<name>), tagged with the Ray job and the run
directory so several jobs' curves stay apart: what cluster/grafana/raylm.json plots."""


class NoTensorBoard:
    """The TensorBoard writer where tensorboard is not installed: writes nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    flush = close = add_scalar


def measure_matmul_flops(n: int = 2048, seconds: float = 1.0) -> float:
    """Dense fp32 n×n matmul FLOP/s on this process's threads: the CPU 'peak' for MFU. The fastest single matmul
    counts, not the mean: anything else running (another rank's start-up, the OS) only slows some of them."""
    a, b = torch.randn(n, n, device="cpu"), torch.randn(n, n, device="cpu")
    a @ b  # warm-up
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak
        log.warning("no peak FLOP/s known for %s; MFU is against an A100's 312 TFLOP/s", name)
        return GPU_PEAK_BF16["A100"]
    return measure_matmul_flops()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_line(m: dict) -> str:
    evals = evaluation_parts(m)
    if "loss" not in m:  # an evaluation-only line (step 0)
        return " | ".join([f"step {m['step']:>6d}", *evals])
    parts = [f"step {m['step']:>6d}", f"loss {m['loss']:.4f}", *evals]
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.2f}", f"{m['tokens_per_s']:,.0f} tok/s",
              f"mfu {100 * m['mfu']:.1f}%", f"step {1000 * m['step_time_s']:.0f}ms",
              f"data {100 * m['data_wait_share']:.1f}%", f"mem {m['peak_mem_gib']:.2f}GiB"]
    return " | ".join(parts)


def evaluation_parts(m: dict) -> list[str]:
    """The validation slice's loss, perplexity and bits per byte, each held-out dataset's loss and each task's
    accuracy, when the line has them (evaluation steps)."""
    parts = [f"val {m['val_loss']:.4f} (ppl {m['val_ppl']:.1f}, {m['val_bpb']:.3f} bpb)"] if "val_loss" in m else []
    for key, value in m.items():
        kind, _, rest = key.partition("/")
        if (kind == "eval" and rest.endswith("/loss")) or (kind == "task" and rest.endswith("/acc")):
            parts.append(f"{rest.rsplit('/', 1)[0]} {value:.3f}")
    return parts


class MetricsLog:
    """Rank 0's sinks. The stdout line and the gauges are set in the loop; metrics.jsonl and TensorBoard are written
    on a background thread, in order, so storage never stalls a step (a failed write is logged, not raised: only
    rank 0 writes, and an error there would leave the other ranks waiting in the next collective).

    metrics.jsonl keeps the lines of earlier segments up to the resume step, so after a resume the file reads as one
    run; each line is appended (an s3:// object cannot be appended to, so there the file is rewritten, off the
    loop). TensorBoard events are written locally; for an s3:// run dir an events file is uploaded only when it has
    grown, and a new one is started past TB_FILE_BYTES, so an upload never re-sends more than that."""

    TB_FILE_BYTES = 1 << 20

    def __init__(self, run_dir: str, *, start_step: int):
        self.path = storage.join(run_dir, "metrics.jsonl")
        self.lines = [l for l in self._existing() if json.loads(l)["step"] <= start_step] if start_step else []
        storage.write_bytes(self.path, "".join(l + "\n" for l in self.lines).encode())
        self.tb_remote = storage.join(run_dir, "tb") if storage.is_s3(run_dir) else None
        self.tb_dir = tempfile.mkdtemp(prefix="raylm-tb-") if self.tb_remote else storage.filesystem(
            storage.join(run_dir, "tb"))[1]
        self.tb_files = 0
        self.tb = self._new_tb_writer()
        self.uploaded: dict[str, int] = {}
        self.tags = {"run": run_dir}
        self.gauges = self._gauges()
        self.latest: dict = {}
        """The newest value of every gauged metric, set again at each log step (val_loss comes only at evals)."""
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-metrics")
        self.pending: list[Future] = []

    def last(self, key: str) -> float | None:
        """The newest value of `key` in the lines kept from earlier segments of the run (None if none has it)."""
        return next((m[key] for m in map(json.loads, reversed(self.lines)) if key in m), None)

    def _existing(self) -> list[str]:
        if not storage.exists(self.path):
            return []
        return [l for l in storage.read_bytes(self.path).decode().splitlines() if l.strip()]

    def _new_tb_writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a GPU box with torch alone: the other sinks still get every metric
            if self.tb_files == 0:
                log.warning("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
            return NoTensorBoard()
        self.tb_files += 1
        return SummaryWriter(self.tb_dir, filename_suffix=f".{self.tb_files}")

    def _gauges(self) -> dict:
        ray = sys.modules.get("ray")  # a run without Ray never imports it: it may not even be installed
        if ray is None or not ray.is_initialized():
            return {}
        from ray.util.metrics import Gauge

        self.tags["job"] = ray.get_runtime_context().get_job_id()
        return {k: Gauge(name, description=f"raylm {k} of the latest log step", tag_keys=("job", "run"))
                for k, name in GAUGES.items()}

    def write(self, m: dict) -> None:
        print(format_line(m), flush=True)
        self.latest.update((key, m[key]) for key in self.gauges if key in m)
        for key, value in self.latest.items():
            self.gauges[key].set(value, tags=self.tags)
        for future in [f for f in self.pending if f.done()]:
            self.pending.remove(future)
            if future.exception() is not None:  # only rank 0 writes: raising would leave the other ranks waiting
                log.warning("writing metrics failed (%s); training goes on", future.exception())
        self.pending.append(self.pool.submit(self._persist, dict(m)))

    def _persist(self, m: dict) -> None:
        line = json.dumps(m, sort_keys=True)
        self.lines.append(line)
        if storage.is_s3(self.path):
            storage.write_bytes(self.path, "".join(l + "\n" for l in self.lines).encode())
        else:
            with open(storage.filesystem(self.path)[1], "a") as f:
                f.write(line + "\n")
        for key, value in m.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, m["step"])
        self.tb.flush()
        if self.tb_remote:
            self._upload_tb()

    def _upload_tb(self) -> None:
        for name in sorted(os.listdir(self.tb_dir)):
            local = os.path.join(self.tb_dir, name)
            size = os.path.getsize(local)
            if self.uploaded.get(name) != size:
                with open(local, "rb") as f:
                    storage.write_bytes(storage.join(self.tb_remote, name), f.read())
                self.uploaded[name] = size
        current = [size for name, size in self.uploaded.items() if name.endswith(f".{self.tb_files}")]
        if sum(current) > self.TB_FILE_BYTES:
            self.tb.close()  # it was just uploaded whole; later events go to a new file
            self.tb = self._new_tb_writer()

    def close(self) -> None:
        """Wait for every pending write."""
        self.pool.shutdown(wait=True)
        for future in self.pending:
            if future.exception() is not None:
                log.warning("writing metrics failed (%s)", future.exception())
        self.tb.close()
        if self.tb_remote:
            self._upload_tb()
