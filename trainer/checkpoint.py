"""Sharded, asynchronous, atomically committed checkpoints in RUN_DIR/checkpoints/step-NNNNNN/ (local or s3://).

Save: the loop waits only while the model and optimizer shards are copied to host memory; a background thread
writes them with torch.distributed.checkpoint (each rank its own shards, rank 0 the metadata), retrying storage
failures with backoff, on a process group of its own so its collectives never interleave with training's. When
dcp.save returns on rank 0 every rank's write is done: rank 0's thread then writes train_state.json and, last,
COMMITTED, and prunes older checkpoints. Only a directory with COMMITTED is ever loaded, and DCP reshards it to any
world size.

With a lease (raylm/lease.py), a save starts writing only while the job holds it, and the commit is marked in the
lease (a compare-and-swap) before train_state.json, which names the lease (token and generation), and COMMITTED: a
commit the lease shows was made after its job lost the run directory is never loaded. After a takeover, step directories carry the holder's
generation (`step-000400-g3`), so a job presumed dead that still writes never writes into the new holder's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import pickle
import posixpath
import re
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from raylm import lease as leases, storage
from raylm.errors import ConfigError, DataError, StorageError
from raylm.paths import InPath
from trainer.distributed import decided_on_rank0
from trainer.model.config import NOT_IN_WEIGHTS, ModelConfig
from trainer.model.transformer import Transformer

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="Detected an existing checkpoint", category=UserWarning)
"""DCP warns when it writes over a directory: raylm does that on purpose to a save cut off before its commit."""

COMMITTED = "COMMITTED"
DATA_ORDER = "feistel-1"
"""The data order's version (trainer/data.py): a checkpoint of another order is another run, never continued."""
TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"step-(\d+)(?:-g(\d+))?$")
"""step-NNNNNN, or step-NNNNNN-gG when written by the lease's generation G after a takeover."""
DCP_ERRORS = (Exception, CheckpointException)
"""What a failed DCP save or load raises: CheckpointException (every rank's errors, gathered) is a BaseException."""
DAMAGE = (OSError, EOFError, pickle.UnpicklingError)
"""What storage or a damaged file raises (pyarrow raises OSError subclasses); anything else is a bug."""


def is_storage_failure(exc: BaseException) -> bool:
    """Whether a DCP error comes from storage or damaged files on every failing rank (not from a bug)."""
    if isinstance(exc, CheckpointException):
        return bool(exc.failures) and all(is_storage_failure(e) for e, _ in exc.failures.values())
    return isinstance(exc, DAMAGE)


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 100
    """Steps between checkpoints; one is always written at the end (0 = only at the end)."""
    keep: int = 2
    """Committed checkpoints kept; older ones are deleted once a newer one is committed."""
    resume_from: InPath = ""
    """Start from this checkpoint (a step-NNNNNN directory, or a run directory's newest) when RUN_DIR has none."""
    load_weights_only: bool = False
    """With resume_from: take only the model weights (a warm start at step 0 with a fresh optimizer)."""
    async_save: bool = True
    """Write in the background (the loop waits only for the copy to host memory); False waits for the commit."""
    retries: int = 3
    """Attempts at writing a checkpoint, with exponential backoff, before the run stops with an error."""
    preempt_grace_s: float = 25.0
    """After a preemption notice (SIGTERM to a worker) the run finishes its step (or, for a notice after the step's
    last backward, one more), saves and commits; a worker still at it this long after the signal exits anyway
    (spot and Kubernetes give ~30 s, AWS spot 2 min). The run warns once when its measured step + save exceed it."""

    def __post_init__(self):
        if self.preempt_grace_s <= 0:
            raise ConfigError(f"checkpoint.preempt_grace_s must be > 0, got {self.preempt_grace_s}")
        for name in ("every", "keep", "retries"):
            if getattr(self, name) < (1 if name != "every" else 0):
                raise ConfigError(f"checkpoint.{name} must be >= {1 if name != 'every' else 0}, got {getattr(self, name)}")
        if self.load_weights_only and not self.resume_from:
            raise ConfigError("checkpoint.load_weights_only needs checkpoint.resume_from (the checkpoint to warm-start from)")


def step_dir(run_dir: str, step: int, suffix: str = "") -> str:
    return storage.join(run_dir, "checkpoints", f"step-{step:06d}{suffix}")


STALE = "stale"
"""A checkpoint's state when its COMMITTED was written by a job after it had lost the run directory's lease."""


def commit_state(path: str, fenced: dict[int, int]) -> str:
    """'committed', 'cut off' (no COMMITTED: the save never finished) or STALE, given the run's lease fences
    (`raylm.lease.fences`); the commit's lease (in train_state.json) is read only when there are fences."""
    if not storage.exists(storage.join(path, COMMITTED)):
        return "cut off"
    if not fenced:
        return "committed"
    state = read_train_state(path)
    generation = state.get("lease", {}).get("generation")  # none: committed without a lease, or before leases
    return STALE if generation in fenced and state["step"] > fenced[generation] else "committed"


def _states(run_dir: str) -> list[tuple[int, str, str]]:
    """(step, path, commit_state) of every checkpoint directory under run_dir, oldest first (of one step, the
    newest generation last)."""
    fenced = leases.fences(leases.holder(run_dir))
    found = []
    for path in storage.list_dirs(storage.join(run_dir, "checkpoints")):
        if match := STEP_DIR.search(path):
            found.append((int(match.group(1)), int(match.group(2) or 0), path))
    return [(step, path, commit_state(path, fenced)) for step, _, path in sorted(found)]


def list_checkpoints(run_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, committed) of every checkpoint directory under run_dir, oldest first; a stale commit (made after
    its job lost the lease) counts as not committed."""
    return [(step, path, state == "committed") for step, path, state in _states(run_dir)]


SKIPPED = {"cut off": f"it has no {COMMITTED} (its save was cut off)",
           STALE: "its job had lost the run directory's lease when it committed it (a takeover fenced it)"}


def latest_committed(run_dir: str, *, quiet: bool = False) -> str | None:
    """The newest committed checkpoint of a run; newer ones cut off or committed stale are skipped with a log line
    (unless quiet)."""
    for _, path, state in reversed(_states(run_dir)):
        if state == "committed":
            return path
        if not quiet:
            log.warning("skipping %s: %s", path, SKIPPED[state])
    return None


def resolve(path: str) -> str:
    """A committed step directory, given one or a run directory (whose newest committed checkpoint is taken)."""
    if STEP_DIR.search(path.rstrip("/")):
        if not storage.exists(path):
            raise DataError(f"checkpoint {path} does not exist{committed_steps(run_dir_of(path))}")
        state = commit_state(path, leases.fences(leases.holder(run_dir_of(path))))
        if state != "committed":
            raise DataError(f"checkpoint {path}: {SKIPPED[state]}; pick another step")
        return path
    if not storage.exists(path):
        raise DataError(f"{path} does not exist; pass a run directory or one of its checkpoints/step-NNNNNN")
    found = latest_committed(path)
    if found is None:
        raise DataError(f"{path} holds no committed checkpoint (checkpoints/step-*/{COMMITTED}); check the path")
    return found


def committed_steps(run_dir: str) -> str:
    """What a missing step directory's message goes on with: the steps its run directory does hold (a run keeps
    only its newest checkpoint.keep, deleting older ones as newer ones commit)."""
    steps = [step for step, _, ok in list_checkpoints(run_dir) if ok]
    if not steps:
        return f"; {run_dir} holds no committed checkpoint"
    return (f" (a run keeps its newest checkpoint.keep checkpoints and deletes older ones); {run_dir} holds step "
            f"{', '.join(map(str, steps))}: pick one of them, or pass {run_dir} for its newest")


READ_BUFFER = 8 << 20
"""Bytes fetched per ranged read when loading from S3: DCP unpickles through many small reads, each of which would
otherwise be a request of its own (seconds for even a tiny checkpoint)."""


def _object_storage(path: str):
    """torch's fsspec storage layer for DCP over raylm's own S3 client (`storage.filesystem`, wrapped for fsspec), so
    checkpoints reach S3 with the endpoint, region, credentials and retries of everything else raylm reads or writes.
    Reads go through a buffer of READ_BUFFER bytes."""
    from fsspec.implementations.arrow import ArrowFSWrapper
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem

    class RaylmS3(FileSystem):
        def init_path(self, path, **kwargs):
            fs, inner = storage.filesystem(str(path))
            self.fs = ArrowFSWrapper(fs)
            return inner

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            if mode != "rb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with io.BufferedReader(self.fs.fs.open_input_file(str(path)), READ_BUFFER) as stream:
                yield stream

    layer = RaylmS3()
    return layer, layer.init_path(path)


def _writer(path: str):
    # an object is durable once its upload returns; DCP's fsync fallback for a stream without a descriptor would
    # be os.sync() of the whole machine
    writer = dcp.FileSystemWriter(storage.absolute(path), sync_files=not storage.is_s3(path))
    if storage.is_s3(path):
        writer.fs, writer.path = _object_storage(path)
    return writer


def _reader(path: str):
    reader = dcp.FileSystemReader(storage.absolute(path))
    if storage.is_s3(path):
        reader.fs, reader.path = _object_storage(path)
    return reader


def _first_line(exc: BaseException) -> str:
    """One line saying what went wrong; for DCP's gathered errors, the first failing rank's own error."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (exc, _) = min(exc.failures.items())
        return f"rank {rank}: {_first_line(exc)}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def verify(path: str) -> None:
    """Every shard file the metadata names exists and is long enough, so a missing or cut-short shard is named here
    instead of failing deep inside DCP (or, for a short read, silently)."""
    try:
        metadata = _reader(path).read_metadata()
    except DAMAGE as exc:
        raise DataError(f"checkpoint {path}: cannot read its metadata ({_first_line(exc)}); "
                        "resume from another checkpoint") from exc
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in sorted(needed.items()):
        actual = storage.size(storage.join(path, name))
        if actual is None or actual < length:
            state = "is missing" if actual is None else f"is cut short ({actual:,} of {length:,} bytes)"
            raise DataError(f"checkpoint shard {storage.join(path, name)} {state}; resume from another checkpoint "
                            "(--checkpoint.resume_from) or delete this one")


def read_train_state(path: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(path, TRAIN_STATE)))


MODEL_DEFAULTS = {f"model.{key}": value for key, value in dataclasses.asdict(ModelConfig()).items()}
"""A checkpoint saved before a model field existed was trained with that field's default."""


def model_identity(model: ModelConfig) -> dict:
    """The model's part of a run's identity: every field but the attention kernel (a run may switch it when it
    resumes) and eos_id (the tokenizer's, which the identity names by its sha256 or the weights it started from)."""
    return {f"model.{key}": value for key, value in dataclasses.asdict(model).items()
            if key not in ("attention", "eos_id")}


def run_identity(model: ModelConfig, dataset, *, data_seed: int, global_batch: int, mix: dict | None = None) -> dict:
    """What a checkpoint shares with any run that continues it, keyed as the user sets each value: the model, the
    dataset it reads (tokenizer, sequence length, rows) and the data order (with its mix of sources, `mix`: data.mix
    or data.mix_schedule's phases, when set). train.steps and the lr schedule are not in it: raising them is how a
    run is extended."""
    return model_identity(model) | {
        "dataset tokenizer sha256": dataset.manifest["tokenizer"]["sha256"], "dataset seq_len": dataset.seq_len,
        "dataset train rows": len(dataset.train), "data.seed": data_seed, "train.global_batch": global_batch,
        "data order": DATA_ORDER, "data mix": mix,
    }


def legacy_rope(identity: dict) -> dict:
    """A checkpoint's identity from before the RoPE scaling kinds: model.rope_scaling was Llama 3.1's factor."""
    scaling = identity.get("model.rope_scaling")
    if not isinstance(scaling, (int, float)):
        return identity
    return {**identity, "model.rope_scaling": "llama3" if scaling else "none",
            **({"model.rope_factor": float(scaling)} if scaling else {})}


def check_continues(state: dict, identity: dict, path: str, *, own: bool, weights_only: bool = False) -> None:
    """Refuse, in one line naming every differing field, to continue a checkpoint of another model, dataset or data
    order (with `weights_only`, only the model must match): loading would fail deep in DCP or, worse, succeed.
    `own`: the checkpoint is the run directory's own (else it came from checkpoint.resume_from)."""
    saved = {**MODEL_DEFAULTS, **legacy_rope(state.get("identity", {}))}  # a field added since: its default
    same_weights = {f"model.{key}" for key in NOT_IN_WEIGHTS} if weights_only else set()
    keys = [k for k in identity if saved.get(k) != identity[k] and k not in same_weights
            and (k.startswith("model.") or not weights_only)]
    if not keys:
        return
    show = lambda value: f"{value[:12]}…" if isinstance(value, str) and len(value) > 16 else value  # noqa: E731
    advice = "use a new --run.dir" if own else "resume from a checkpoint of this model, dataset and data order"
    if not any(k.startswith("model.") for k in keys):
        advice += (f", or start a new run from its weights with --checkpoint.resume_from={run_dir_of(path)} "
                   "--checkpoint.load_weights_only=true")
    subject = f"run directory {run_dir_of(path)} holds checkpoints" if own else f"checkpoint {path} was"
    raise ConfigError(f"{subject} trained with {', '.join(f'{k}={show(saved.get(k))}' for k in keys)}; this run has "
                      f"{', '.join(f'{k}={show(identity[k])}' for k in keys)}: {advice}")


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, verified: bool = False) -> None:
    """Load a committed checkpoint into the (sharded) model and, unless None, the optimizer; `verified`: its shards
    were checked already (by rank 0, whose verdict every rank got).

    Collective. The shards are resharded to this world size by DCP."""
    if not verified:
        verify(path)
    model_sd, optim_sd = get_state_dict(model, optimizer or [])
    state = {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, storage_reader=_reader(path))
    except DCP_ERRORS as exc:
        if not is_storage_failure(exc):
            raise
        raise DataError(f"checkpoint {path} could not be loaded ({_first_line(exc)}); resume from another one") from exc
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def is_checkpoint_path(path: str) -> bool:
    """A step directory or a run directory with checkpoints/ (as opposed to a weights file or a HF folder)."""
    return bool(STEP_DIR.search(path.rstrip("/"))) or bool(storage.list_dirs(storage.join(path, "checkpoints")))


def run_dir_of(step_path: str) -> str:
    return posixpath.dirname(posixpath.dirname(step_path.rstrip("/")))


def read_model(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, full state dict) of a committed checkpoint, gathered from its shards in this one process
    (no process group needed): for generation and export."""
    verify(path)
    cfg = ModelConfig(**read_train_state(path)["model"])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    state = model.state_dict()
    read_weights(path, state)
    return cfg, state


def read_weights(path: str, state: dict[str, torch.Tensor]) -> None:
    """Fill `state` (a plain model's state dict, on any device) with the weights saved in `path` by a checkpoint
    or `write_weights`, resharded from however many ranks wrote them, in this one process."""
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in a single process, which is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, storage_reader=_reader(path), no_dist=True)
    except DCP_ERRORS as exc:
        if not is_storage_failure(exc):
            raise
        raise DataError(f"checkpoint {path} could not be loaded ({_first_line(exc)}); use another one") from exc


def write_weights(path: str, model: nn.Module) -> None:
    """The model's weights alone to `path`, each rank its own shards (collective): what `read_weights` reads."""
    dcp.save({"model": get_model_state_dict(model)}, storage_writer=_writer(path))


class Checkpointer:
    """Saves of one run, at most one in flight. `save` is collective: every rank calls it at the same steps.

    The copy of a save's state to host memory runs beside the next step's forward and backward; the loop waits for
    it only before that step's update (`wait_staged`), and for a previous save still in flight (at most one is, to
    bound host memory). Writing, the commit (train_state.json, then COMMITTED, by rank 0 once
    dcp.save has returned there, i.e. once every rank's shards and the metadata are written) and pruning all run on
    a background thread. Every second the loop waits counts in `blocked_seconds`."""

    def __init__(self, run_dir: str, cfg: CheckpointConfig, *, rank: int, device: torch.device,
                 lease: str | None = None):
        self.run_dir, self.cfg, self.rank, self.device, self.lease = run_dir, cfg, rank, device, lease
        self.group = dist.new_group(backend="gloo")  # the background writes' collectives, apart from training's
        self.suffix = self._on_rank0(self._names, f"the lease of {run_dir} could not be read")
        """Of this job's step directories: its lease generation once the run has been taken over. (Only rank 0 may
        know the lease, as under torchrun: every decision about it is rank 0's, broadcast.)"""
        cuda = device.type == "cuda"  # pinned buffers and copies on a stream of the stager's own, beside the compute
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                   use_async_staging=True, use_non_blocking_copy=cuda))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-checkpoint")
        self.pending: Future | None = None
        self.staging: Future | None = None
        """The copy to host memory of the newest save, until an update has waited for it."""
        self.committed: str | None = None
        """The newest checkpoint committed and not yet handed out by `take_committed` (reported to Ray)."""
        self.blocked_seconds = 0.0
        """Time the loop spent waiting on checkpoints since `take_blocked`."""
        self.save_seconds: float | None = None
        """Seconds from the start of the save of `committed` (or of the newest one handed out) to its commit
        (staging, write, commit): what a preemption notice waits for after its step."""

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict) -> None:
        t0 = time.perf_counter()
        self._wait()
        started = time.perf_counter()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        path = step_dir(self.run_dir, step, self.suffix)
        if self.cfg.async_save:
            if self.device.type == "cuda":  # the stager's stream must see this step's update before it copies
                self.stager._staging_stream.wait_stream(torch.cuda.current_stream())
            staged = self.staging = self.stager.stage(state)  # a Future: the copy runs while the next step computes
            self.pending = self.pool.submit(
                lambda: self._write_and_commit(staged.result(), path, step, train_state, started))
        else:
            self.committed, self.save_seconds = self._write_and_commit(state, path, step, train_state, started)
        self.blocked_seconds += time.perf_counter() - t0

    def _write_and_commit(self, state: dict, path: str, step: int, train_state: dict,
                          started: float) -> tuple[str, float]:
        """Every rank's write, then rank 0's commit, both only while this job holds the run directory's lease (a
        job that lost it writes no step directory again); a failure fails the save on every rank alike. Returns the
        path and the seconds since `started`, the perf_counter() at the save's start, to the commit."""
        self._on_rank0(self._check_held, f"checkpoint {path} could not start")
        self._write(state, path)
        self._on_rank0(lambda: self._commit(path, step, train_state), f"checkpoint {path} could not be committed")
        seconds = time.perf_counter() - started
        if self.rank == 0:
            self.prune()
        return path, seconds

    def _commit(self, path: str, step: int, train_state: dict) -> None:
        """The commit marked in the lease, train_state.json naming the lease, then COMMITTED."""
        if self.lease is not None:
            generation = leases.record_commit(self.run_dir, self.lease, step)
            train_state = {**train_state, "lease": {"token": self.lease, "generation": generation}}
        storage.write_bytes(storage.join(path, TRAIN_STATE), json.dumps(train_state).encode())
        storage.write_bytes(storage.join(path, COMMITTED), f"{step}\n".encode())  # last: the commit
        log.info("checkpoint %s committed", path)

    def _check_held(self) -> None:
        if self.lease is not None:
            leases.check_held(self.run_dir, self.lease)

    def _names(self) -> str:
        """The suffix of this job's step directories: its generation once the run's lease fences a job that may
        still write (that job's names are then never this job's)."""
        if self.lease is None:
            return ""
        record = leases.holder(self.run_dir)
        return f"-g{record['generation']}" if record and record.get("token") == self.lease and record.get("fenced") \
            else ""

    def _on_rank0(self, fn: Callable, failed: str):
        """fn() on rank 0, its result (or its LeaseLost, or a storage failure as a StorageError starting with
        `failed`) given to every rank of the checkpoint group: they raise or go on together."""

        def storage_failure_named():
            try:
                return fn()
            except OSError as exc:
                raise StorageError(f"{failed} ({_first_line(exc)}); check the run directory's storage") from None

        return decided_on_rank0(storage_failure_named, rank=self.rank, group=self.group)

    def _write(self, state: dict, path: str) -> None:
        """dcp.save with retries on storage failures. A failure on any rank fails the save on every rank (DCP
        gathers the errors), so the ranks retry together; any other error is a bug and keeps its traceback."""
        for attempt in range(1, self.cfg.retries + 1):
            try:
                dcp.save(state, storage_writer=_writer(path), process_group=self.group)
                return
            except DCP_ERRORS as exc:
                if not is_storage_failure(exc):
                    raise
                if attempt == self.cfg.retries:
                    raise StorageError(f"checkpoint {path} could not be written in {attempt} attempts "
                                       f"({_first_line(exc)}); check the run directory's storage") from exc
                delay = 2.0 ** (attempt - 1)
                log.warning("checkpoint %s: write failed (%s); retrying in %.0fs", path, _first_line(exc), delay)
                time.sleep(delay)

    def wait_staged(self) -> None:
        """Wait until the save's copy to host memory is done: before an update changes the parameters."""
        if self.staging is None:
            return
        t0 = time.perf_counter()
        self.staging.result()
        self.staging = None
        self.blocked_seconds += time.perf_counter() - t0

    def _wait(self) -> None:
        """Wait for the save in flight (re-raising its error)."""
        if self.pending is not None:
            future, self.pending = self.pending, None
            self.committed, self.save_seconds = future.result()

    def finish(self) -> float:
        """Wait for the save in flight, counted as blocked time: the end of a run. Returns the seconds waited."""
        if self.pending is None:
            return 0.0
        t0 = time.perf_counter()
        self._wait()
        waited = time.perf_counter() - t0
        self.blocked_seconds += waited
        return waited

    def take_blocked(self) -> float:
        seconds, self.blocked_seconds = self.blocked_seconds, 0.0
        return seconds

    def take_committed(self) -> str | None:
        """The newest checkpoint committed since the last call, without waiting for one in flight. Collective (at
        log steps): the ranks agree whether the save is done, so a failed one raises on every rank at once."""
        if self.pending is not None:
            done = torch.tensor([int(self.pending.done())], device=self.device)
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
            if done.item():
                self._wait()
        path, self.committed = self.committed, None
        return path

    def prune(self) -> None:
        """Delete all but the newest `keep` committed checkpoints, and cut-off saves older than the newest commit.
        A failure is only logged: the next commit prunes again."""
        try:
            self._prune()
        except OSError as exc:
            log.warning("pruning old checkpoints of %s failed (%s); the next commit tries again", self.run_dir,
                        _first_line(exc))

    def _prune(self) -> None:
        found = list_checkpoints(self.run_dir)
        committed = [path for _, path, ok in found if ok]
        if not committed:
            return
        keep = set(committed[-self.cfg.keep:])
        newest = max(step for step, path, ok in found if ok)
        for step, path, _ in found:
            if path not in keep and step < newest:
                storage.delete_dir(path)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.stager.close()
