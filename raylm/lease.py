"""One job per directory (a training run's RUN_DIR, a dataprep output): DIR/lease.json names the job that holds it,
and that job renews it while it runs.

A second job on the same directory stops with one line naming the holder, before any work. A lease not renewed for
`seconds` (its holder presumed dead: a lost head, a killed driver) is taken over with a log line; so is one whose
holder process is gone from this very host. A job that loses its lease (taken over, or not renewable for `seconds`
because storage is unreachable: another job may have taken it meanwhile) is stopped by its renewal thread.

Every change of the lease is a compare-and-swap: created only if absent, renewed, taken over, released or marked
with a commit only if it is still the version read (S3: a conditional PUT with If-None-Match / If-Match; a local or
shared filesystem: under the file's flock). So two jobs that start together cannot both win, and a job presumed dead
that still runs cannot renew or commit after the takeover. A store that ignores conditional writes (detected once,
logged once) falls back to write, wait SETTLE_S, read back: the last writer holds it, and the other sees that.

Commits: rank 0 marks each checkpoint's step in the lease (`record_commit`, a compare-and-swap) before it writes the
checkpoint's COMMITTED. A takeover of a holder that may still run fences it: the record keeps, per generation (one
per acquire), the newest step that holder committed, so a commit it makes afterwards is known to be stale and never
loaded; and from then on every holder writes its checkpoints under names of its own generation, which a stale job
never writes. A record with fences is kept when its holder releases it (marked released); one without is deleted.
Expiry compares wall clocks of different machines (NTP keeps them within a fraction of `seconds`).
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
from raylm.errors import RaylmError, StorageError

log = logging.getLogger(__name__)

LEASE = "lease.json"
SETTLE_S = 0.25
"""The fallback without conditional writes: the wait between writing a lease and reading it back: two jobs both take
it only if one's read and write are further apart than this."""
UPDATE_TRIES = 20
"""Compare-and-swaps of one change in a row that may lose to this holder's own other writes (a commit beside a
renewal) before the change fails as a storage error."""
UNKNOWN = {"job": "?", "host": "?", "pid": "?"}
_warned_fallback: set[str] = set()


class RunDirBusy(RaylmError):
    """Another job holds the directory."""


class LeaseLost(RaylmError):
    """Another job took the directory over while this one ran (or this one could not renew its lease in time)."""


def describe(holder: dict) -> str:
    return f"job {holder['job']} (host {holder['host']}, pid {holder['pid']})"


def _read(path: str, *, versioned: bool) -> tuple[dict | None, str | None]:
    """(record, version) of the lease; the record is None if there is none or it is unreadable (cut short by a crash
    mid-write on a filesystem without atomic writes: nobody holds it, and its version still guards the overwrite)."""
    if versioned:
        got = storage.read_versioned(path)
    else:
        try:
            got = storage.read_bytes(path), None
        except FileNotFoundError:
            got = None
    if got is None:
        return None, None
    try:
        return json.loads(got[0]), got[1]
    except ValueError:
        return None, got[1]


def _put(path: str, record: dict, version: str | None) -> str:
    """Write `record` if the lease is still at `version`; its new version. A write whose reply was lost and that a
    retry then found done is recognised by its bytes (each record differs: it carries the time of writing)."""
    data = json.dumps(record, sort_keys=True).encode()
    try:
        return storage.write_if(path, data, version=version)
    except storage.PreconditionFailed:
        now = storage.read_versioned(path)
        if now is not None and now[0] == data:
            return now[1]
        raise


def _is_dead(holder: dict, now: float) -> tuple[str | None, bool]:
    """(why a holder is presumed dead, or None while it may be alive; whether it might still run nonetheless)."""
    if now > holder["expires"]:
        return f"not renewed for {now - holder['renewed']:.0f}s", True
    if holder["host"] == socket.gethostname() and not _pid_alive(holder["pid"]):
        return "its process is gone from this host", False
    return None, False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _lost_message(held: dict | None, directory: str, what: str) -> str:
    who = describe(held) if held and not held.get("released") else "nobody (the lease was released or deleted)"
    return f"{what} {directory} is now held by {who}: this job stops; what it committed before stays as it was"


def _update(path: str, token: str, change: Callable[[dict], dict], *, conditional: bool, what: str) -> dict:
    """Apply `change` to the lease record while the job with `token` holds it: a compare-and-swap, read again and
    retried when another write of the same holder (a commit beside a renewal) came between; LeaseLost once another
    job holds it. Without conditional writes: read, check, write."""
    directory = storage.parent(path)
    for _ in range(UPDATE_TRIES):
        held, version = _read(path, versioned=conditional)
        if held is None or held.get("token") != token or held.get("released"):
            raise LeaseLost(_lost_message(held, directory, what))
        new = change(held)
        if not conditional:
            storage.write_bytes(path, json.dumps(new, sort_keys=True).encode())
            return new
        try:
            _put(path, new, version)
            return new
        except storage.PreconditionFailed:
            continue
    raise OSError(f"{path}: changed under this job {UPDATE_TRIES} times in a row")


class Lease:
    """This job's hold on a directory: `acquire` it before the work, `close` it when the job ends. `what` and `flag`
    name the directory in messages ("run directory", "--run.dir")."""

    def __init__(self, directory: str, *, job: str, seconds: float, what: str = "run directory",
                 flag: str = "--run.dir"):
        self.directory, self.path = directory, storage.join(directory, LEASE)
        self.seconds, self.what, self.flag = seconds, what, flag
        self.me = {"token": uuid.uuid4().hex, "job": job, "host": socket.gethostname(), "pid": os.getpid()}
        self.lost: str | None = None
        """Why this job no longer holds the directory (set by the renewal thread)."""
        self.conditional = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.me["token"]

    def acquire(self, *, on_lost: Callable[[], None] | None = None) -> "Lease":
        """Take the lease or raise RunDirBusy naming its live holder; then renew it every seconds / 4 on a thread,
        which calls `on_lost` if this job loses it. Storage failing here is a StorageError (an unwritable or
        unreachable directory, before any work)."""
        try:
            self._take()
        except OSError as exc:
            raise StorageError(f"cannot write the output: {storage.describe_os_error(exc, self.path)} (taking the "
                               f"{self.what}'s lease)") from None
        self._thread = threading.Thread(target=self._renew, args=(on_lost,), name="raylm-lease", daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        self.conditional = storage.conditional_writes(self.path)
        held, version = _read(self.path, versioned=self.conditional)
        record = self._successor(held)
        if not self.conditional:
            self._settle(record)
            return
        try:
            _put(self.path, record, version)
        except storage.PreconditionFailed:  # another job wrote first: it holds the lease
            raise RunDirBusy(self._busy_message(_read(self.path, versioned=True)[0] or UNKNOWN)) from None

    def _successor(self, held: dict | None) -> dict:
        """This job's record, following `held` (raises RunDirBusy while that holder may be alive). Taking over a
        holder presumed dead by expiry fences it at its newest commit: it may still run."""
        now = time.time()
        generation, fenced = 1, {}
        if held is not None:
            generation, fenced = held.get("generation", 0) + 1, dict(held.get("fenced", {}))
            if not held.get("released"):
                reason, may_run = _is_dead(held, now)
                if reason is None:
                    raise RunDirBusy(self._busy_message(held))
                log.warning("taking over %s from %s: %s, presumed dead", self.path, describe(held), reason)
                if may_run and "generation" in held:  # (a lease of an older raylm has no generation to fence)
                    fenced[str(held["generation"])] = held.get("committed", -1)
        return {**self.me, "renewed": now, "expires": now + self.seconds, "generation": generation,
                "committed": -1, "fenced": fenced}

    def _settle(self, record: dict) -> None:
        """The fallback for a store without conditional writes: write, wait, read back."""
        if self.path not in _warned_fallback:
            _warned_fallback.add(self.path)
            log.warning("%s: the store ignores conditional writes (or boto3 is missing): the lease is taken by "
                        "write, wait %.2fs, read back, which two jobs starting together can both pass", self.path,
                        SETTLE_S)
        storage.write_bytes(self.path, json.dumps(record, sort_keys=True).encode())
        time.sleep(SETTLE_S)
        held, _ = _read(self.path, versioned=False)
        if held is None or held["token"] != self.token:  # another job wrote after us: it holds the lease
            raise RunDirBusy(self._busy_message(held or UNKNOWN))

    def _busy_message(self, held: dict) -> str:
        return (f"{self.what} {self.directory} is held by {describe(held)}, renewed until "
                f"{time.strftime('%H:%M:%S', time.localtime(held.get('expires', 0)))}; stop that job first, or use "
                f"another {self.flag} (a lease not renewed for {self.seconds:.0f}s is taken over)")

    def _renew(self, on_lost: Callable[[], None] | None) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.seconds / 4):
            try:
                _update(self.path, self.token, self._extended, conditional=self.conditional, what=self.what)
                renewed = time.monotonic()
                continue
            except LeaseLost as exc:
                self.lost = str(exc)
            except OSError as exc:
                reason = storage.describe_os_error(exc, self.path)
                if time.monotonic() - renewed < self.seconds:  # a hiccup: the next renewal tries again
                    log.warning("renewing %s failed (%s); retrying", self.path, reason)
                    continue
                self.lost = (f"this job could not renew its lease on {self.what} {self.directory} for "
                             f"{self.seconds:.0f}s ({reason}); another job may have taken it over, so this one stops")
            if on_lost is not None:
                on_lost()
            else:  # nobody to stop: the commit check stops the run at its next checkpoint
                log.warning("lease lost: %s", self.lost)
            return

    def _extended(self, held: dict) -> dict:
        now = time.time()
        return {**held, "renewed": now, "expires": now + self.seconds}

    def close(self) -> None:
        """Stop renewing and release the lease (if still held): delete it, or keep it marked released if it fences a
        job that may still run. A failure is logged: the lease then lapses after `seconds`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is not None:
            return
        try:
            held, version = _read(self.path, versioned=self.conditional)
            if held is None or held.get("token") != self.token:
                return
            if held.get("fenced"):
                _update(self.path, self.token, lambda h: {**h, "released": True, "expires": time.time()},
                        conditional=self.conditional, what=self.what)
            elif self.conditional:
                storage.delete_if(self.path, version=version)
            else:
                storage.delete_file(self.path)
        except (storage.PreconditionFailed, LeaseLost):
            pass  # taken over just now: the lease is the new holder's
        except storage.NoConditionalWrites:  # a store with conditional PUTs but not DELETEs
            storage.delete_file(self.path)
        except OSError as exc:
            log.warning("releasing %s failed (%s); it lapses in %.0fs", self.path,
                        storage.describe_os_error(exc, self.path), self.seconds)


def check_held(directory: str, token: str, *, what: str = "run directory") -> None:
    """Raise LeaseLost unless the job with `token` still holds the directory: before a save starts writing."""
    held, _ = _read(storage.join(directory, LEASE), versioned=False)
    if held is None or held.get("token") != token or held.get("released"):
        raise LeaseLost(_lost_message(held, directory, what))


def record_commit(directory: str, token: str, step: int) -> int:
    """Mark `step` committed by the job with `token` in the lease (a compare-and-swap: LeaseLost if another job took
    the directory over); returns the holder's generation, which the commit marker carries. Rank 0 calls it right
    before writing COMMITTED: a takeover after it fences this holder at `step` or later, so the commit stands."""
    path = storage.join(directory, LEASE)
    record = _update(path, token, lambda held: {**held, "committed": max(held.get("committed", -1), step)},
                     conditional=storage.conditional_writes(path), what="run directory")
    return record["generation"]


def holder(directory: str) -> dict | None:
    """The lease record of a directory (held, released or fenced), or None."""
    return _read(storage.join(directory, LEASE), versioned=False)[0]


def fences(record: dict | None) -> dict[int, int]:
    """Generation -> newest step that generation's holder committed before it was taken over: a commit of that
    generation at a later step was made after it lost the lease."""
    return {int(generation): step for generation, step in ((record or {}).get("fenced") or {}).items()}


@contextlib.contextmanager
def held(directory: str, *, job: str, seconds: float, what: str = "run directory", flag: str = "--run.dir"):
    """Hold the directory's lease for the block. If this job loses it meanwhile, the block is interrupted (as by
    Ctrl-C, when it runs on the main thread: a Ray driver aborts its run) and LeaseLost says why."""
    on_lost = _thread.interrupt_main if threading.current_thread() is threading.main_thread() else None
    lease = Lease(directory, job=job, seconds=seconds, what=what, flag=flag).acquire(on_lost=on_lost)
    try:
        yield lease
    except (KeyboardInterrupt, SystemExit):
        if lease.lost:
            raise LeaseLost(lease.lost) from None
        raise
    finally:
        lease.close()
