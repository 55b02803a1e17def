"""One job per run directory: RUN_DIR/lease.json names the job that holds it, and that job renews it while it runs.

A second job on the same RUN_DIR stops with one line naming the holder, before any compute. A lease not renewed for
`run.lease_s` (its holder presumed dead: a lost head, a killed driver) is taken over with a log line; so is one whose
holder process is gone from this very host. The job that lost its lease is stopped by its renewal thread, and rank 0
checks the lease before each commit, so a job presumed dead that still runs (a partitioned cluster) never commits
again.

S3 has no compare-and-swap that every S3-compatible store supports, so taking a lease is write, wait, read back: of
two jobs that start together the last writer holds it, and the other sees that and stops. Expiry compares wall
clocks of different machines (NTP keeps them within a fraction of `run.lease_s`).
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

from raylm import storage
from raylm.errors import RaylmError

log = logging.getLogger(__name__)

LEASE = "lease.json"
SETTLE_S = 0.25
"""Wait between writing a lease and reading it back: two jobs both take it only if one's read and write are further
apart than this (S3 is read-after-write consistent: a PUT that returned is what every later read sees)."""


class RunDirBusy(RaylmError):
    """Another job holds the run directory."""


class LeaseLost(RaylmError):
    """Another job took the run directory over while this one ran."""


def describe(holder: dict) -> str:
    return f"job {holder['job']} (host {holder['host']}, pid {holder['pid']})"


def _read(path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except ValueError:  # cut short by a crash mid-write on a filesystem without atomic renames: nobody holds it
        return None


def _is_dead(holder: dict, now: float) -> str | None:
    """Why a holder is presumed dead, or None while it may be alive."""
    if now > holder["expires"]:
        return f"not renewed for {now - holder['renewed']:.0f}s"
    if holder["host"] == socket.gethostname() and not _pid_alive(holder["pid"]):
        return "its process is gone from this host"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Lease:
    """This job's hold on a run directory: `acquire` it before launching, `close` it when the job ends."""

    def __init__(self, run_dir: str, *, job: str, seconds: float):
        self.run_dir, self.path = run_dir, storage.join(run_dir, LEASE)
        self.seconds = seconds
        self.me = {"token": uuid.uuid4().hex, "job": job, "host": socket.gethostname(), "pid": os.getpid()}
        self.lost: str | None = None
        """Why this job no longer holds the run directory (set by the renewal thread)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.me["token"]

    def acquire(self, *, on_lost: Callable[[], None] | None = None) -> "Lease":
        """Take the lease or raise RunDirBusy naming its live holder; then renew it every lease_s / 4 on a thread,
        which calls `on_lost` if another job takes it over."""
        held = _read(self.path)
        if held is not None and held["token"] != self.token:
            reason = _is_dead(held, time.time())
            if reason is None:
                raise RunDirBusy(self._busy_message(held))
            log.warning("taking over %s from %s: %s, presumed dead", self.path, describe(held), reason)
        self._write()
        time.sleep(SETTLE_S)
        held = _read(self.path)
        if held is None or held["token"] != self.token:  # another job wrote after us: it holds the lease
            raise RunDirBusy(self._busy_message(held or {"job": "?", "host": "?", "pid": "?"}))
        self._thread = threading.Thread(target=self._renew, args=(on_lost,), name="raylm-lease", daemon=True)
        self._thread.start()
        return self

    def _busy_message(self, held: dict) -> str:
        return (f"run directory {self.run_dir} is held by {describe(held)}, renewed until "
                f"{time.strftime('%H:%M:%S', time.localtime(held.get('expires', 0)))}; stop that job first, or use "
                f"another --run.dir (a lease not renewed for {self.seconds:.0f}s is taken over)")

    def _write(self) -> float:
        """Write the lease; returns when it expires."""
        now = time.time()
        storage.write_bytes(self.path, json.dumps({**self.me, "renewed": now, "expires": now + self.seconds}).encode())
        return now + self.seconds

    def _renew(self, on_lost: Callable[[], None] | None) -> None:
        expires = time.time() + self.seconds
        while not self._stop.wait(self.seconds / 4):
            try:
                self.lost = self._why_lost(_read(self.path), expires)
                if self.lost:
                    if on_lost is not None:
                        on_lost()
                    else:  # nobody to stop: the commit check stops the run at its next checkpoint
                        log.warning("lease lost: %s", self.lost)
                    return
                expires = self._write()
            except OSError as exc:  # storage hiccup: try again at the next renewal; the commit check still guards
                log.warning("renewing %s failed (%s); retrying", self.path, storage.describe_os_error(exc, self.path))

    def _why_lost(self, held: dict | None, expires: float) -> str | None:
        """Why this job no longer holds the run directory: taken over, deleted, or lapsed (not renewed in time, so
        another job may have presumed this one dead)."""
        if held is not None and held["token"] != self.token:
            why = f"{describe(held)} took over run directory {self.run_dir}"
        elif held is None:
            why = f"{self.path} was deleted"
        elif time.time() > expires:
            why = f"this job's lease on {self.run_dir} lapsed"
        else:
            return None
        return why + "; this job stopped without committing again"

    def close(self) -> None:
        """Stop renewing and release the lease (if still held)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and (held := _read(self.path)) is not None and held["token"] == self.token:
            storage.delete_file(self.path)


def check_held(run_dir: str, token: str) -> None:
    """Raise LeaseLost unless the job with `token` still holds run_dir: rank 0 calls it before each commit."""
    held = _read(storage.join(run_dir, LEASE))
    if held is None or held["token"] != token:
        who = describe(held) if held else "nobody (the lease was deleted)"
        raise LeaseLost(f"run directory {run_dir} is now held by {who}: this job stops without committing; its "
                        "newest checkpoints stay as they were")


@contextlib.contextmanager
def held(run_dir: str, *, job: str, seconds: float):
    """Hold run_dir's lease for the block. If another job takes it over meanwhile, the block is interrupted (as by
    Ctrl-C, when it runs on the main thread: a Ray driver aborts its run) and LeaseLost says by whom."""
    on_lost = _thread.interrupt_main if threading.current_thread() is threading.main_thread() else None
    lease = Lease(run_dir, job=job, seconds=seconds).acquire(on_lost=on_lost)
    try:
        yield lease
    except (KeyboardInterrupt, SystemExit):
        if lease.lost:
            raise LeaseLost(lease.lost) from None
        raise
    finally:
        lease.close()
