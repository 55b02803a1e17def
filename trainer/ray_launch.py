"""Ray Train: the same training loop in a TorchTrainer, one worker per process (GPU or CPU), metrics to Ray; and
`python -m trainer.eval`'s scoring the same way (`launch_eval`).

Every worker reports at each log step (`ray.train.report`), so the run's metrics show in the Ray dashboard's
Train view. RUN_DIR itself is Ray's run directory (storage_path = its parent, name = its last component), so the
checkpoints committed under it are reported to Ray where they lie. A dead worker restarts the group
(FailureConfig), and the loop resumes from the newest committed checkpoint by itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import sys
import time
from typing import TYPE_CHECKING

from raylm import storage
from raylm.config import from_dict, to_dict
from raylm.errors import RaylmError
from raylm.lease import held
from raylm.ray_session import check_local_paths, init_ray, verbose
from trainer.checkpoint import COMMITTED
from trainer.job import JobConfig, paths
from trainer.preemption import Preempted

if TYPE_CHECKING:
    from trainer.eval.job import EvalJob
    from trainer.rl.config import RLJob

log = logging.getLogger(__name__)


def quiet_report_log() -> None:
    """Ray 2.60 logs every `ray.train.report` call at INFO under a logger named by its file path, which
    LoggingConfig does not reach; with a report per log step that would double the console output."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class DropUserErrorTraceback(logging.Filter):
    """Ray Train logs the traceback of any exception leaving the train function. A user mistake (a RaylmError) is
    printed by the driver as one `error:` line instead; its traceback would only bury that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from raylm.errors import find_user_error

        return find_user_error(sys.exc_info()[1]) is None  # Ray logs from inside its `except` block


class _DropStartRetries(logging.Filter):
    """Ray Train logs each start attempt that timed out with its traceback, then tries again; StartWatch tells how
    the wait ended in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

        return not (record.exc_info and isinstance(record.exc_info[1], WorkerGroupStartupTimeoutError))


def quiet_user_error_tracebacks() -> None:
    """In a worker (Train's function runner) and in the controller (its callback runner, where StartWatch raises)."""
    from ray.train.v2._internal import util
    from ray.train.v2._internal.execution import callback_manager

    for module in (util, callback_manager):
        logging.getLogger(module.__name__).addFilter(DropUserErrorTraceback())


def report_to_ray(metrics: dict, checkpoint: str | None) -> None:
    """Every worker's report; a committed checkpoint is registered where it lies (RUN_DIR is Ray's run directory),
    never uploaded a second time."""
    import ray.train

    ckpt = None
    if checkpoint:
        fs, path = storage.filesystem(checkpoint)
        ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def train_worker(config: dict) -> dict:
    """Runs on each Ray Train worker; rank 0's return value becomes `Result.return_value`."""
    from trainer.train import run

    quiet_report_log()
    quiet_user_error_tracebacks()
    job = from_dict(JobConfig, config["job"])
    check_local_paths(paths(job), shared_fs=job.storage.shared_fs, where=config["driver_node"])
    import ray

    tasks = None if config.get("tasks") is None else ray.get(config["tasks"])
    return run(job, report=report_to_ray, lease=config["lease"], tasks=tasks,
               reference_only=config.get("reference_only", False))


def user_error_of(exc: BaseException) -> RaylmError | None:
    """The RaylmError a worker raised, if that is what failed the run (Ray wraps worker errors)."""
    from raylm.errors import find_user_error

    failures = getattr(exc, "worker_failures", None) or getattr(getattr(exc, "__cause__", None), "worker_failures", None)
    controller = getattr(exc, "controller_failure", None)  # e.g. StartWatch's WorkersNotStarted
    for failure in [*(failures or {}).values(), *([controller] if controller else [])]:
        if (found := find_user_error(failure)) is not None:
            return found
    return find_user_error(exc)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the checkpoints reported in a run directory; Ray refuses to start a run whose record names
a checkpoint that no longer exists."""


def forget_pruned_checkpoints(run_dir: str) -> None:
    """raylm owns checkpoint retention (`checkpoint.keep`, pruned after each commit, with or without Ray) and
    resumes from its own COMMITTED markers, never from Ray's record. Ray writes its record only when a checkpoint is
    reported, so after a crash, a Ctrl-C or a kill it may still name checkpoints raylm has pruned since, or be from
    another Ray version: such a record is dropped before Ray reads it, and Ray starts a new one."""
    path = storage.join(run_dir, RAY_SNAPSHOT)
    if not storage.exists(path):
        return
    import ray

    try:
        record = json.loads(storage.read_bytes(path))
        names = [entry["checkpoint_dir_name"] for entry in record["checkpoint_results"]]
        current = record["ray_version"] == ray.__version__
    except (ValueError, KeyError, TypeError):
        names, current = [], False
    # the first one missing decides: a long run's record names every checkpoint it ever reported
    gone = next((name for name in names if not storage.exists(storage.join(run_dir, name, COMMITTED))), None)
    if gone or not current:
        log.info("dropping Ray Train's record of this run's checkpoints (%s): raylm resumes from its own",
                 f"it names pruned {gone}" if gone else "unreadable, or another Ray version's")
        storage.delete_file(path)


class WorkerLost(RaylmError):
    """A worker process or its node died and the run's restarts (ray.max_failures) are spent."""


def lost_worker(exc: BaseException) -> str | None:
    """Ray's word for a dead worker, if a worker's death (not an error it raised) failed the run."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    for failure in (getattr(exc, "worker_failures", None) or {}).values():
        if isinstance(failure, WorkerHealthCheckFailedError):
            lines = [line for line in str(failure).splitlines() if "actor died" in line or "exit" in line.lower()]
            return (lines or [str(failure).splitlines()[0]])[0].strip()
    return None


class WorkersNotStarted(RaylmError):
    """A Train run's worker group found no room to start within ray.start_timeout_s."""


START_ATTEMPT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's timeout of one attempt to start the worker group (60 s by default); it retries a timed-out start for
ever, whatever FailureConfig says."""


def set_start_attempts(timeout_s: float) -> None:
    """Ray Train's start attempts (as the environment sets them, or Ray's 60 s), shortened to divide `timeout_s`
    evenly: StartWatch looks at the clock when an attempt fails, so the run stops at `timeout_s`, not up to an
    attempt later. Ray passes the variable on from this driver to its controller."""
    attempt = float(os.environ.get(START_ATTEMPT_ENV, 60))
    os.environ[START_ATTEMPT_ENV] = f"{timeout_s / math.ceil(timeout_s / attempt):g}"


def what_holds(per_worker: dict, workers: int) -> str:
    """What a worker group of `workers` × `per_worker` finds no room for, as `ray status` tells it: each resource
    short, the cluster's total and free amounts, and the placement groups that hold it, each with the job (driver
    pid and command) that made it. Works in any Ray process: it asks the GCS, not the State API."""
    import ray
    from ray._private.state import jobs
    from ray.util import placement_group_table

    total, free = ray.cluster_resources(), ray.available_resources()
    drivers = {job["JobID"]: f"pid {job['DriverPid']}: {' '.join(job['Entrypoint'].split())[:80]}"
               for job in jobs() if not job["IsDead"]}
    groups = [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
    lines = []
    for name, amount in per_worker.items():
        if amount * workers <= free.get(name, 0):
            continue
        holders = [f"{held:g} by placement group {pg['placement_group_id'][:8]} of job {job} "
                   f"({drivers.get(job, 'its driver has ended')})"
                   for pg in groups if (held := sum(b.get(name, 0) for b in pg["bundles"].values()))
                   for job in [pg["placement_group_id"][-8:]]]  # a placement group's id ends in its job's
        lines.append(f"{amount * workers:g} {name} wanted, the cluster has {total.get(name, 0):g}, "
                     f"{free.get(name, 0):g} free" + (f", held {'; '.join(holders)}" if holders else ""))
    return "; ".join(lines) or "the cluster has room again now"


def start_watch(timeout_s: float, *, per_worker: dict, workers: int):
    """A Ray Train controller callback that ends the run with one line (WorkersNotStarted: what is missing, who
    holds it) once its worker group has waited `timeout_s` in all for room to start or restart, rather than let
    Ray retry for ever. Checked as a start attempt fails (`set_start_attempts`)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller.state import RunningState

    class StartWatch(ControllerCallback):
        waiting_since: float | None = None

        def after_controller_start(self, train_run_context) -> None:
            from ray.train.v2._internal.execution.controller import controller

            quiet_user_error_tracebacks()  # the one line is the story, not its traceback in the controller's log
            if not verbose():
                logging.getLogger(controller.__name__).addFilter(_DropStartRetries())

        def after_controller_state_update(self, previous_state, current_state) -> None:
            if isinstance(current_state, RunningState):
                self.waiting_since = None
            elif self.waiting_since is None:
                self.waiting_since = time.monotonic()

        def before_controller_execute_failure_decision(self, failure_decision) -> None:
            if self.waiting_since is not None and time.monotonic() - self.waiting_since >= timeout_s:
                each = ", ".join(f"{amount:g} {name}" for name, amount in per_worker.items())
                raise WorkersNotStarted(
                    f"the run's {workers} workers ({each} each) found no room to start in {timeout_s:g} s: "
                    f"{what_holds(per_worker, workers)}; lower --ray.num_workers or --ray.cpus_per_worker, free "
                    "the cluster, or raise --ray.start_timeout_s")

    return StartWatch()


def launch(job: JobConfig, *, callbacks: list | None = None, tasks: list | None = None, reference_only: bool = False):
    """Train with Ray Train on `job.ray.num_workers` workers; returns Ray's Result. `tasks`: [eval]'s tasks as the
    caller tokenized them, put in the object store once for every worker (None: each worker tokenizes them).

    Ray's controller polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and a report waits
    until the previous one was polled: log steps closer together than that block the loop (lower it, as the tests
    do, for runs that log every fraction of a second); a shorter poll costs CPU on every run."""
    import ray

    init_ray()
    return run_held(job, train_worker, paths(job), callbacks=callbacks,
                    config={"tasks": None if tasks is None else ray.put(tasks), "reference_only": reference_only})


def launch_rl(job: RLJob):
    """`python -m trainer.rl`'s run under Ray Train (its rank 0 makes the rollout actors); returns Ray's Result."""
    from trainer.rl.config import job_paths

    return run_held(job, rl_worker, job_paths(job), config={})


def run_held(job, worker, job_paths: dict[str, str], *, config: dict, callbacks: list | None = None):
    """`worker` on the job's Ray Train worker group, `config` beside the job, the lease and the driver's node in
    its train_loop_config. The driver holds RUN_DIR's lease for the whole run (raylm/lease.py), across the worker
    group's restarts."""
    import ray

    init_ray()
    check_local_paths(job_paths, shared_fs=job.storage.shared_fs)
    context = ray.get_runtime_context()
    with held(job.run.dir, job=f"ray job {context.get_job_id()}", seconds=job.run.lease_s) as lease:
        return fit(job, worker, {"job": to_dict(job), "lease": lease.token, "driver_node": context.get_node_id(),
                                 **config}, callbacks=callbacks)


def worker_resources(use_gpu: bool, cpus_per_worker: float) -> dict:
    return {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}


def torch_trainer(worker, config: dict, *, workers: int | tuple[int, int], use_gpu: bool, cpus_per_worker: float,
                  scaling: dict | None = None, **run):
    """A TorchTrainer of `worker` on `workers` workers (a (min, max) range: elastic), quiet as raylm's commands are;
    `run`: the rest of its RunConfig."""
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = worker_resources(use_gpu, cpus_per_worker)
    return TorchTrainer(
        worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     **(scaling or {})),
        run_config=RunConfig(
            logging_config=LoggingConfig(log_level="WARNING"),
            # Train's print patch tees each print to stdout and to its logger: every line would show twice
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}, **run),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def fit_raising_user_errors(trainer):
    """trainer.fit(), with a worker's user error (but a preemption) raised as itself, printed as one line (with
    --debug, with Ray's whole chain), and Ctrl-C as KeyboardInterrupt."""
    try:
        return trainer.fit()
    except SystemExit:  # Ray's Ctrl-C handler aborts the run, then exits the driver this way
        raise KeyboardInterrupt() from None
    except Exception as exc:  # noqa: BLE001 - a worker's user error is re-raised as itself
        user_error = user_error_of(exc)
        if user_error is not None and not isinstance(user_error, Preempted):
            raise user_error from exc
        raise


def fit(job, worker, config: dict, *, callbacks: list | None):
    """TorchTrainer.fit of `worker` on the job's worker group (training's or RL's), its failure turned into one
    line when it is a user's to fix."""
    from ray.train import FailureConfig

    fs, path = storage.filesystem(job.run.dir)
    cfg = job.ray
    set_start_attempts(cfg.start_timeout_s)
    watch = start_watch(cfg.start_timeout_s, per_worker=worker_resources(cfg.use_gpu, cfg.cpus_per_worker),
                        workers=cfg.min_workers or cfg.num_workers)
    trainer = torch_trainer(
        worker, config,
        workers=(cfg.min_workers, cfg.num_workers) if cfg.min_workers else cfg.num_workers,
        use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
        scaling={"elastic_resize_monitor_interval_s": cfg.resize_check_s},
        name=posixpath.basename(path), storage_path=posixpath.dirname(path), storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.max_failures), callbacks=[*(callbacks or []), watch])
    forget_pruned_checkpoints(job.run.dir)
    try:
        return fit_raising_user_errors(trainer)
    except Exception as exc:  # noqa: BLE001 - a preemption or a lost worker with the restarts spent: one line
        user_error = user_error_of(exc)
        death = f"{user_error}" if isinstance(user_error, Preempted) else lost_worker(exc)
        if death is not None:
            raise WorkerLost(f"a worker died or was preempted ({death}) and the run's restarts are spent "
                             f"(ray.max_failures={job.ray.max_failures}); run the same command again to continue "
                             "from the newest committed checkpoint") from exc
        raise
    finally:
        drop_storage_marker(job.run.dir)


def drop_storage_marker(run_dir: str) -> None:
    """Delete the empty file Ray Train writes into its run directory (RUN_DIR) to check that every node can write
    there: it proves nothing once the run is over, and it is not the run's. Ray checks it again before each
    checkpoint it records, so it goes only after the fit (and a resumed run writes it anew)."""
    from ray.train.v2._internal.constants import VALIDATE_STORAGE_MARKER_FILENAME

    storage.delete_file(storage.join(run_dir, VALIDATE_STORAGE_MARKER_FILENAME))


def rl_worker(config: dict) -> dict:
    """`python -m trainer.rl` on each Ray Train worker; rank 0's return value becomes `Result.return_value`."""
    from trainer.rl.config import RLJob, job_paths
    from trainer.rl.loop import run

    quiet_report_log()
    quiet_user_error_tracebacks()
    job = from_dict(RLJob, config["job"])
    check_local_paths(job_paths(job), shared_fs=job.storage.shared_fs, where=config["driver_node"])
    return run(job, report=report_to_ray, lease=config["lease"])


def eval_worker(config: dict) -> dict:
    """Runs on each Ray Train worker; rank 0's return value becomes `Result.return_value`."""
    import ray

    from trainer.eval.job import EvalJob, evaluate, job_paths

    quiet_user_error_tracebacks()
    job = from_dict(EvalJob, config["job"])
    check_local_paths(job_paths(job), shared_fs=job.storage.shared_fs, where=config["driver_node"])
    return evaluate(job, ray.get(config["tasks"]))


def launch_eval(job: EvalJob, tasks: list) -> dict:
    """`python -m trainer.eval`'s scoring under Ray Train on job.ray.num_workers workers (a failed worker fails the
    evaluation: it holds no state worth a restart). `tasks`: as the driver tokenized them, put in the object store
    once for every worker to read."""
    import ray

    from trainer.eval.job import job_paths

    init_ray()
    check_local_paths(job_paths(job), shared_fs=job.storage.shared_fs)
    context = ray.get_runtime_context()
    config = {"job": to_dict(job), "driver_node": context.get_node_id(), "tasks": ray.put(tasks)}
    trainer = torch_trainer(eval_worker, config,
                            workers=job.ray.num_workers, use_gpu=job.ray.use_gpu,
                            cpus_per_worker=job.ray.cpus_per_worker, name=f"raylm-eval-{context.get_job_id()}")
    return fit_raising_user_errors(trainer).return_value
