"""Where a log step's metrics go: one stdout line, metrics.jsonl, TensorBoard, Ray Train, Ray's Prometheus gauges.

Also the hardware peak that MFU divides by: a table for known GPUs; on CPU, the best dense fp32 matmul FLOP/s ever
measured on this machine at this thread count (`cpu_peak_flops`): each run measures for a second at start and keeps
the best in a per-machine cache, so a run that starts while the machine is busy does not lower the peak, and runs of
the same job report the same MFU for the same tokens/s.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import queue
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs
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
    """Dense fp32 n×n matmul FLOP/s on this process's threads, one measurement (`cpu_peak_flops` keeps the best).
    The fastest single matmul counts, not the mean: anything else running (another rank's start-up, the OS) only
    slows some of them; but on a machine busy for the whole second, all of them."""
    a, b = torch.randn(n, n, device="cpu"), torch.randn(n, n, device="cpu")
    a @ b  # warm-up
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_cache_path() -> str:
    """The per-machine cache of CPU peaks: $RAYLM_CACHE_DIR, else $XDG_CACHE_HOME/raylm, else ~/.cache/raylm. Delete
    it to measure afresh (the machine's image or settings changed)."""
    root = os.environ.get("RAYLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "raylm")
    return os.path.join(root, "cpu_peak_flops.json")


def cpu_key() -> str:
    """What a CPU peak is a peak of: the processor, the threads the matmul may use, and the torch build."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown")
    return f"{model} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:  # not Linux: the key falls back to "unknown" (still per thread count and torch build)
        return []


def cpu_peak_flops() -> float:
    """The CPU 'peak' for MFU: this run's measurement or the best this machine gave before, whichever is larger."""
    return best_peak(measure_matmul_flops())


def best_peak(measured: float) -> float:
    """The larger of `measured` and the best cached for this machine (`cpu_key`), the cache raised when `measured` is
    better. A one-off measurement swings with whatever else runs (another rank's start-up, other jobs): measured once
    per run it moved MFU between 36 % and 65 % for the same job. An unwritable cache costs only the stability."""
    path, key = peak_cache_path(), cpu_key()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: start it
        cache = {}
    if measured <= cache.get(key, 0.0):
        return cache[key]
    cache[key] = measured
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False, suffix=".tmp") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(f.name, path)  # whole or not at all: ranks of one node may write at once
    except OSError as exc:
        log.warning("cannot cache the CPU peak in %s (%s): MFU is against this run's measurement", path, exc)
    return measured


def device_peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak
        log.warning("no peak FLOP/s known for %s; MFU is against an A100's 312 TFLOP/s", name)
        return GPU_PEAK_BF16["A100"]
    return cpu_peak_flops()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_line(m: dict) -> str:
    evals = evaluation_parts(m)
    if "loss" not in m:  # an evaluation-only line (step 0)
        return " | ".join([f"step {m['step']:>6d}", *evals])
    parts = [f"step {m['step']:>6d}", f"loss {m['loss']:.4f}", *evals]
    if "reward_mean" in m:  # an RL step (trainer/rl)
        return " | ".join([*parts, f"reward {m['reward_mean']:.3f} acc {m['accuracy']:.2f}", f"kl {m['kl']:.4f}",
                           f"len {m['reply_len']:.1f}", f"clip {m['clip_frac']:.3f}", f"ent {m['entropy']:.2f}",
                           f"rollout {m['rollout_s']:.2f}s reward {m['reward_s']:.2f}s update {m['update_s']:.2f}s "
                           f"sync {m['sync_s']:.2f}s"])
    if "rewards/accuracy" in m:  # preference tuning
        parts.append(f"reward acc {m['rewards/accuracy']:.2f} margin {m['rewards/margin']:.3f}")
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.2f}", f"{m['tokens_per_s']:,.0f} tok/s",
              f"mfu {100 * m['mfu']:.1f}%", f"step {1000 * m['step_time_s']:.0f}ms",
              f"data {100 * m['data_wait_share']:.1f}%", f"mem {m['peak_mem_gib']:.2f}GiB"]
    return " | ".join(parts)


def evaluation_parts(m: dict) -> list[str]:
    """The validation slice's loss, perplexity and bits per byte (preference pairs': loss and reward accuracy), each
    held-out dataset's loss and each task's accuracy, when the line has them (evaluation steps)."""
    parts = []
    if "val/accuracy" in m:  # RL's held-out prompts, answered greedily
        parts = [f"val acc {m['val/accuracy']:.2f} (reward {m['val/reward_mean']:.3f})"]
    elif "val_rewards/accuracy" in m:
        parts = [f"val {m['val_loss']:.4f} (reward acc {m['val_rewards/accuracy']:.2f})"]
    elif "val_loss" in m:
        parts = [f"val {m['val_loss']:.4f} (ppl {m['val_ppl']:.1f}, {m['val_bpb']:.3f} bpb)"]
    for key, value in m.items():
        kind, _, rest = key.partition("/")
        if (kind == "eval" and rest.endswith("/loss")) or (kind == "task" and rest.endswith("/acc")):
            parts.append(f"{rest.rsplit('/', 1)[0]} {value:.3f}")
    return parts


SEGMENTS = "metrics"
"""The folder of a run's metrics on object storage (see `Segments`)."""


def read_metrics(run_dir: str) -> list[dict]:
    """Every line of a run's metrics as one stream, in order, as a resumed run keeps them: what every reader of a
    run's metrics calls. The segments under RUN_DIR/metrics/ where a run on object storage wrote them (even when the
    run directory has since been copied to local disk), else RUN_DIR/metrics.jsonl; [] before the first line."""
    if storage.list_dirs(storage.join(run_dir, SEGMENTS)):
        return Segments.read(storage.join(run_dir, SEGMENTS))
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(l) for l in storage.read_bytes(path).decode().splitlines() if l.strip()]


class Segments:
    """metrics.jsonl on object storage, where an object cannot be appended to: bytes uploaded grow with the lines
    written (about twice their size), not with lines x steps.

    Each start of a run (an attempt) writes under its own folder, `metrics/00003-from-000000400/` (attempt 3, resumed
    from step 400); a reader keeps the lines of earlier attempts up to each later attempt's start step, so nothing
    is rewritten at a resume and the stream reads as one run, as a local metrics.jsonl truncated at the resume does.
    In an attempt, each write is one small object `tail/00000130.jsonl` (its first line's index in the attempt), so
    a line is readable as soon as it is written; once CHUNK_LINES lines are waiting they go together into one
    `part-00000128.jsonl` and their small objects are deleted. A reader takes each line index once, so a chunk
    whose small objects are not deleted yet (a crash in between) reads the same."""

    CHUNK_LINES = 64

    def __init__(self, root: str, *, start_step: int):
        attempts = [int(posixpath.basename(d).split("-")[0]) for d in storage.list_dirs(root)]
        self.dir = storage.join(root, f"{max(attempts, default=-1) + 1:05d}-from-{start_step:09d}")
        self.chunked = 0
        """Index of the first line not yet in a chunk."""
        self.tail: list[str] = []
        self._put(storage.join(self.dir, "tail", f"{0:08d}.jsonl"), [])  # from now on, readers cut at start_step

    def append(self, lines: list[str]) -> None:
        first = self.chunked + len(self.tail)
        self.tail += lines
        if len(self.tail) < self.CHUNK_LINES:
            self._put(storage.join(self.dir, "tail", f"{first:08d}.jsonl"), lines)
            return
        self._put(storage.join(self.dir, f"part-{self.chunked:08d}.jsonl"), self.tail)
        self.chunked, self.tail = self.chunked + len(self.tail), []
        fs, tail = storage.filesystem(storage.join(self.dir, "tail"))
        fs.delete_dir_contents(tail, missing_dir_ok=True)  # one listing and one batch delete

    @staticmethod
    def _put(path: str, lines: list[str]) -> None:
        fs, p = storage.filesystem(path)
        with fs.open_output_stream(p, compression=None) as f:  # no directory to create on object storage
            f.write("".join(l + "\n" for l in lines).encode())

    @staticmethod
    def read(root: str) -> list[dict]:
        kept: list[dict] = []
        for attempt in storage.list_dirs(root):
            start_step = int(posixpath.basename(attempt).rsplit("-", 1)[1])
            kept = [m for m in kept if m["step"] <= start_step] + Segments._read_attempt(attempt)
        return kept

    @staticmethod
    def _read_attempt(attempt: str) -> list[dict]:
        fs, inner = storage.filesystem(attempt)

        def text(path: str) -> str:
            with fs.open_input_stream(path, compression=None) as f:
                return f.read().decode()

        while True:
            files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                           if f.type == pafs.FileType.File)
            try:
                with ThreadPoolExecutor(max_workers=16) as pool:  # one GET each, in parallel
                    texts = list(pool.map(text, files))
                break
            except FileNotFoundError:  # a chunk took these small objects' lines after the listing: list again
                continue
        lines: dict[int, str] = {}
        for path, body in zip(files, texts):
            first = int(posixpath.basename(path).removeprefix("part-").removesuffix(".jsonl"))
            for i, line in enumerate(body.splitlines()):
                lines.setdefault(first + i, line)
        return [json.loads(lines[i]) for i in sorted(lines)]


class MetricsLog:
    """Rank 0's sinks. The stdout line and the gauges are set in the loop; metrics.jsonl and TensorBoard are written
    on a background thread, in order, so storage never stalls a step (a failed write is logged, not raised: only
    rank 0 writes, and an error there would leave the other ranks waiting in the next collective). Its backlog is
    bounded: with BACKLOG lines waiting (storage slower than the log interval for that long), a step's line is
    dropped with a warning rather than memory growing; lines waiting together go out in one write.

    A resumed run's metrics keep the lines of earlier attempts up to the resume step, so they read as one run
    (`read_metrics`). Locally metrics.jsonl is cut there at start and appended to; on s3:// the lines go to
    `Segments`. TensorBoard events are written locally; for an s3:// run dir the events files that grew are uploaded
    at most every TB_UPLOAD_S seconds (and at the end), and a new one is started past TB_FILE_BYTES, so an upload
    never re-sends more than that."""

    TB_FILE_BYTES = 1 << 20
    TB_UPLOAD_S = 30.0
    BACKLOG = 1000

    def __init__(self, run_dir: str, *, start_step: int):
        self.kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step] if start_step else []
        if storage.is_s3(run_dir):
            self.segments, self.path = Segments(storage.join(run_dir, SEGMENTS), start_step=start_step), None
        else:
            self.segments, self.path = None, storage.filesystem(storage.join(run_dir, "metrics.jsonl"))[1]
            storage.write_bytes(self.path, "".join(json.dumps(m, sort_keys=True) + "\n" for m in self.kept).encode())
        self.tb_remote = storage.join(run_dir, "tb") if storage.is_s3(run_dir) else None
        self.tb_dir = tempfile.mkdtemp(prefix="raylm-tb-") if self.tb_remote else storage.filesystem(
            storage.join(run_dir, "tb"))[1]
        self.tb_files = 0
        self.tb = self._new_tb_writer()
        self.uploaded: dict[str, int] = {}
        self.tb_upload_at = 0.0
        self.tags = {"run": run_dir}
        self.gauges = self._gauges()
        self.latest: dict = {}
        """The newest value of every gauged metric, set again at each log step (val_loss comes only at evals)."""
        self.backlog: queue.Queue[dict | None] = queue.Queue(maxsize=self.BACKLOG)
        self.writer = threading.Thread(target=self._drain, name="raylm-metrics", daemon=True)
        self.writer.start()

    def last(self, key: str) -> float | None:
        """The newest value of `key` in the lines kept from earlier attempts of the run (None if none has it)."""
        return next((m[key] for m in reversed(self.kept) if key in m), None)

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
        try:
            self.backlog.put_nowait(dict(m))
        except queue.Full:  # never block the loop, never grow without bound
            log.warning("metrics: %d log lines late (storage is slower than the log interval); the line of step %d "
                        "is dropped", self.BACKLOG, m["step"])

    def _drain(self) -> None:
        """The writer thread: everything waiting goes out in one write, until close() sends None."""
        while True:
            batch = [self.backlog.get()]
            while not self.backlog.empty():
                batch.append(self.backlog.get_nowait())
            lines = [m for m in batch if m is not None]
            try:
                if lines:
                    self._persist(lines)
            except Exception as exc:  # only rank 0 writes: raising would leave the other ranks waiting
                log.warning("writing metrics failed (%s); training goes on", exc)
            for _ in batch:
                self.backlog.task_done()  # so backlog.join() waits for what was written before it
            if batch[-1] is None:
                return

    def _persist(self, ms: list[dict]) -> None:
        lines = [json.dumps(m, sort_keys=True) for m in ms]
        if self.segments:
            self.segments.append(lines)
        else:
            with open(self.path, "a") as f:
                f.write("".join(l + "\n" for l in lines))
        for m in ms:
            for key, value in m.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, m["step"])
        self.tb.flush()
        if self.tb_remote and time.monotonic() >= self.tb_upload_at:
            self._upload_tb()
            self.tb_upload_at = time.monotonic() + self.TB_UPLOAD_S

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
        self.backlog.put(None)
        self.writer.join()
        self.tb.close()
        if self.tb_remote:
            self._upload_tb()
