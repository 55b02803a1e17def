"""How a raylm command joins Ray: the cluster named by RAY_ADDRESS (or one running on this machine), else a local
Ray of its own for this one command; quiet unless `--verbose`.

Quiet means raylm's own lines carry the story: Ray's C++ log lines below FATAL are off (in this process and in the
processes of a cluster it starts), the lines Ray forwards from workers lose their `(RayTrainWorker pid=…)` prefix
and Ray's known-harmless chatter, and colour codes go only to a terminal. Python warnings and errors from Ray, a
dead worker, a failed task still show. `--verbose` shows everything as Ray prints it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

VERBOSE_ENV = "RAYLM_VERBOSE"
"""Set to 1 by `--verbose` on any raylm command (`run_cli`)."""

KNOWN_NOISE = re.compile(
    r"has constructor arguments in the object store and max_restarts > 0"  # each actor pool and Train controller
    r"|Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"  # the price of quieting the rest
    r"|\[state-dump\]"  # a dying raylet's event-loop statistics, ~20 lines under its one-line cause
)
"""Lines Ray prints that say nothing to a raylm user."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def starts_its_own_cluster() -> bool:
    """True when ray.init() would start a new local Ray rather than join one (RAY_ADDRESS, `ray start`)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(None) is None
    except (ValueError, ConnectionError):  # several local clusters, or a bad RAY_ADDRESS: ray.init says which
        return False


def init_ray(*, log_to_driver: bool = True) -> None:
    """Join or start Ray once per process, quietly unless verbose. `log_to_driver=False`: workers' lines stay in
    Ray's log files (for a command whose driver prints the story itself)."""
    import ray

    if ray.is_initialized():
        return
    if starts_its_own_cluster():  # lives for this one command; Ray <= 2.59's default. RAY_AUTH_MODE=token wins
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not sys.stdout.isatty():  # Ray colours the worker prefixes it prints (with --verbose)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if verbose():
        ray.init(logging_level=logging.INFO, log_to_driver=log_to_driver)
        return
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    fold_worker_lines()
    with stderr_without_noise():
        ray.init(logging_level=logging.WARNING, log_to_driver=log_to_driver)
    logging.getLogger("ray").setLevel(logging.WARNING)


@contextlib.contextmanager
def stderr_without_noise():
    """This process's file descriptor 2 (where Ray's C++ code writes) through a file, re-emitting what is not
    KNOWN_NOISE once the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if not KNOWN_NOISE.search(line):
                    print(line, file=sys.stderr)


def fold_worker_lines() -> None:
    """Print the lines Ray forwards from workers without their process prefix or KNOWN_NOISE, and undeduplicated
    (Ray's dedup note carries colour codes). Ray binds its printer when ray.init connects, so this runs before."""
    from ray._private import worker

    def raylm_print(data: dict, ignore_prefix: bool) -> None:
        lines = [line for line in data.get("lines", []) if not KNOWN_NOISE.search(line)]
        if lines:
            worker.print_worker_logs({**data, "lines": lines}, sys.stderr if data["is_err"] else sys.stdout,
                                     ignore_prefix=True)

    worker.print_to_stdstream = raylm_print


def quiet_ray_data() -> None:
    """Ray Data's console handler at WARNING unless verbose (its ~20 INFO lines a run, even before a one-line
    error); its log file in Ray's session directory keeps everything."""
    import ray.data  # noqa: F401 - configures Ray Data's loggers

    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)


def check_local_paths(paths: dict[str, str], *, shared_fs: bool, where: str | None = None) -> None:
    """Refuse local paths (`{"--run.dir": path, ...}`) that the nodes of this Ray cluster would each read or write
    on their own disk: on a cluster of more than one node (joined here if need be, so a command can check before
    it writes anything), and (`where`: the driver's node id, checked in a worker) on any node but the driver's,
    which an autoscaled cluster adds after the launch check. `storage.shared_fs` says the paths are on a filesystem
    every node mounts."""
    import ray

    from raylm.errors import ConfigError
    from raylm.storage import is_s3

    local = [(flag, path) for flag, path in paths.items() if path and not is_s3(path)]
    if shared_fs or not local:
        return
    if where is None:
        if not ray.is_initialized():
            if starts_its_own_cluster():  # a Ray of this command's own: one node
                return
            init_ray()
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
        if nodes <= 1:
            return
        reason = f"this Ray cluster has {nodes} nodes, each with its own disk"
    elif ray.get_runtime_context().get_node_id() == where:
        return
    else:
        reason = "this worker runs on another node than the driver, with a disk of its own"
    flag, path = local[0]
    raise ConfigError(f"{flag} {path} is a local path, but {reason}: use an s3:// URL, or --storage.shared_fs=true if "
                      f"{path} is on a filesystem every node mounts (NFS)")
