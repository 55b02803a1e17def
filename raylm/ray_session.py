"""How a raylm command joins Ray: the cluster named by RAY_ADDRESS, else the one `ray start` recorded on this
machine, else a local Ray of its own for this one command; quiet unless `--verbose`.

A command never joins another command's private Ray: Ray records only `ray start`'s cluster (in
`<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`), and that record is the only one read here. A private Ray gets ports
of its own, and every process it starts inherits its address in RAY_ADDRESS, so nothing inside Ray (Ray Train's
placement-group cleaner, the State API) looks the cluster up by scanning the machine, where it could find another
command's. An address that does not answer is one `error:` line within seconds, never a `ray.init` that waits for
minutes: a recorded `ray start` cluster that has died is such an error too, since a user who ran `ray start` expects
that cluster, not a Ray of this machine alone.

Quiet means raylm's own lines carry the story on the console, and only there: this driver's own C++ log lines below
FATAL are off, the lines Ray forwards from workers lose their `(RayTrainWorker pid=…)` prefix, Ray's C++ lines below
ERROR and its known-harmless chatter, and colour codes go only to a terminal; the log files of the cluster's
processes (raylet, GCS, workers) keep Ray's usual level.
Python warnings and errors from Ray, a dead worker, a failed task still show. `--verbose` shows everything as Ray
prints it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import tempfile

from raylm.errors import RaylmError

VERBOSE_ENV = "RAYLM_VERBOSE"
"""Set to 1 by `--verbose` on any raylm command (`run_cli`)."""

KNOWN_NOISE = re.compile(
    r"has constructor arguments in the object store and max_restarts > 0"  # each actor pool and Train controller
    r"|\[state-dump\]"  # a dying raylet's event-loop statistics, ~20 lines under its one-line cause
    r"|^\[\d{4}-\d\d-\d\d [\d:,]+ [DIW] \d+ \d+\]"  # Ray's C++ logging below ERROR (its log files keep it)
)
"""Lines Ray prints that say nothing to a raylm user."""

JOIN_TIMEOUT_S = 5.0
"""How long a cluster to join may take to answer before the command stops with one line."""


_own_address: str | None = None
"""RAY_ADDRESS as this process set it for a private Ray it started (ended once ray.is_initialized() is False)."""


class RayUnreachable(RaylmError):
    """The Ray cluster a command is to join (RAY_ADDRESS, or `ray start`'s record) does not answer."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def cluster_to_join() -> tuple[str, str] | None:
    """(address, where it came from: `RAY_ADDRESS=…` or the path of `ray start`'s record) of the cluster a command
    joins: RAY_ADDRESS, else the cluster `ray start` recorded on this machine; None: the command starts a local Ray
    of its own. RAY_ADDRESS=local (Ray's word for "start one", so also the way past a stale record) and auto (Ray's
    "any cluster on this machine", which may be another command's) count as unset."""
    from ray._private.utils import get_ray_address_file

    address = os.environ.get("RAY_ADDRESS", "")
    if address == _own_address:  # this process's own private Ray, shut down since: start another
        address = ""
    if address not in ("", "auto", "local"):
        return address, f"RAY_ADDRESS={address}"
    if address == "local":
        return None
    record = get_ray_address_file(None)
    try:
        with open(record) as f:
            recorded = f.read().strip()
    except FileNotFoundError:
        return None
    return (recorded, record) if recorded else None


def starts_its_own_cluster() -> bool:
    """True when this command starts a local Ray of its own rather than join one (RAY_ADDRESS, `ray start`)."""
    return cluster_to_join() is None


def check_answers(address: str, source: str, *, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Refuse, in one line, a cluster whose address does not answer within `timeout`: `ray.init` would retry for
    minutes, deaf to Ctrl-C and SIGTERM. A GCS address must also answer as a gRPC server (a port something else
    took since, or a GCS still shutting down, does not).

    A dead cluster that `ray start`'s record (`source`) names is refused too, not passed over for a Ray of this
    command's own: the record may be a worker node's, naming a head elsewhere, or a head that is restarting, and a
    user who ran `ray start` expects that cluster's nodes and storage, not this machine alone. The line says how to
    go on either way."""
    import grpc

    scheme, _, hostport = address.rpartition("://")
    host, _, port = hostport.partition("/")[0].rpartition(":")
    if source.startswith("RAY_ADDRESS"):
        cluster = source
        fix = "start that cluster, fix RAY_ADDRESS, or unset it to run on a local Ray of this command's own"
    else:
        cluster = f"the Ray cluster at {address}, named by {source} (left by a `ray start` on this machine),"
        fix = ("start that cluster again (`ray start`), delete the record if the cluster is gone for good, or set "
               "RAY_ADDRESS=local to run on a local Ray of this command's own")
    if not host or not port.isdigit():
        raise RayUnreachable(f"{cluster} is not a Ray address (host:port, or ray://host:port); {fix}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        if scheme in ("", "ray"):
            with grpc.insecure_channel(f"{host}:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=timeout)
    except (OSError, grpc.FutureTimeoutError) as exc:
        why = getattr(exc, "strerror", None) or f"no answer in {timeout:g} s"
        raise RayUnreachable(f"{cluster} does not answer ({why}): {fix}") from None


def init_ray(*, log_to_driver: bool = True) -> None:
    """Join or start Ray once per process (see the module's docstring), quietly unless verbose.
    `log_to_driver=False`: workers' lines stay in Ray's log files (for a command whose driver prints the story
    itself)."""
    import ray

    if ray.is_initialized():
        return
    if not sys.stdout.isatty():  # Ray colours the worker prefixes it prints (with --verbose)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    join = cluster_to_join()
    if join is not None:
        check_answers(*join)
    options = {"address": join[0]} if join else private_cluster()
    if verbose():
        ray.init(logging_level=logging.INFO, log_to_driver=log_to_driver, **options)
        return
    fold_worker_lines()
    with stderr_without_noise(), quiet_driver_backend():
        ray.init(logging_level=logging.WARNING, log_to_driver=log_to_driver, **options)
    logging.getLogger("ray").setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_driver_backend():
    """This process's C++ log lines below FATAL off (they go to the console: an actor pool's or the Train
    controller's start-up warning), and only this process's: Ray reads RAY_BACKEND_LOG_LEVEL as a process's core
    worker starts, and ray.init starts the cluster's processes, which inherit the environment, before it connects
    this driver; so the variable is set just for that connect, and the log files of the raylet, the GCS and every
    worker keep Ray's usual level (this driver's python-core-driver log keeps FATAL only)."""
    from ray._private import worker

    connect = worker.connect

    def quiet_connect(*args, **kwargs):
        os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
        try:
            return connect(*args, **kwargs)
        finally:
            del os.environ["RAY_BACKEND_LOG_LEVEL"]

    if "RAY_BACKEND_LOG_LEVEL" in os.environ:  # the user's choice, for every process
        yield
        return
    worker.connect = quiet_connect
    try:
        yield
    finally:
        worker.connect = connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def private_cluster() -> dict:
    """ray.init's options for a local Ray of this command's own, which lives as long as the command: a GCS and a
    dashboard on ports the system picks (two commands that start at once never race for Ray's fixed defaults), and
    its address in RAY_ADDRESS, which every process the cluster starts inherits. Token authentication is off
    (Ray <= 2.59's default; RAY_AUTH_MODE=token wins)."""
    from ray._private.services import get_node_ip_address

    global _own_address
    port = free_port()
    _own_address = f"{get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the head node ray.init starts
    os.environ["RAY_ADDRESS"] = _own_address
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return {"address": "local", "dashboard_port": free_port()}


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
