"""A preemption notice becomes one last checkpoint: SIGTERM to any worker (a spot reclaim passed on by the pod's
preStop hook, a Kubernetes eviction, a SLURM preemption) makes the whole run save and commit at the end of the next
step, then stop, so Ray restarts it from that step as from any failure. A preempted run loses at most a step
instead of up to `checkpoint.every`.

The notice reaches every rank inside the step's token-count all-reduce (one more number in a collective the step
makes anyway). Its host copy is queued right behind that all-reduce and read at the step's end, so the host waits
only until the device has started the step, never for the whole step. If the save is not committed within
`checkpoint.preempt_grace_s` of the signal, the process exits as a SIGTERM without this handler would have made it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from raylm.errors import RaylmError

log = logging.getLogger(__name__)


class Preempted(RaylmError):
    """The run stopped after a preemption notice, with its checkpoint committed; Ray restarts it from there."""


class _Notice:
    """The process's SIGTERM handler and what it saw: a signal handler belongs to the process, not to a run."""

    def __init__(self):
        self.at: float | None = None
        """time.monotonic() of the first SIGTERM."""
        self.grace_s = 0.0
        self.previous = None
        self.deadline: threading.Timer | None = None

    def handle(self, signum, frame) -> None:
        if self.at is not None:  # a second SIGTERM, or the grace period is over: exit as without this handler
            self.restore()
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.at = time.monotonic()  # said once the save is committed: Ray's own stops send SIGTERM too
        self.deadline = threading.Timer(self.grace_s, os.kill, args=(os.getpid(), signal.SIGTERM))
        self.deadline.daemon = True
        self.deadline.start()

    def set(self) -> None:
        self.at, self.previous = None, signal.signal(signal.SIGTERM, self.handle)

    def restore(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


_NOTICE = _Notice()


def _on_main_thread(action: str) -> None:
    """`_NOTICE.set()` or `.restore()`: signal handlers are set on the main thread only. Under Ray Train the loop
    runs on a thread of the worker actor, whose main thread runs this as an actor task (`RayTrainWorker.execute`);
    it is the same process, so it is the same `_NOTICE`."""
    if threading.current_thread() is threading.main_thread():
        getattr(_NOTICE, action)()
        return
    import ray

    ray.get(ray.get_runtime_context().current_actor.execute.remote(_on_main_thread, action))


class Preemption:
    """The ranks' agreement, step by step, on whether any of them got a preemption notice."""

    def __init__(self, device: torch.device, *, grace_s: float):
        _NOTICE.grace_s = grace_s
        cuda = device.type == "cuda"
        self._host = torch.zeros((), device="cpu", pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None

    def __enter__(self) -> "Preemption":
        _on_main_thread("set")
        return self

    def __exit__(self, *exc) -> None:
        _on_main_thread("restore")

    @staticmethod
    def requested() -> float:
        """1.0 once this process got a notice: summed over the ranks in the step's all-reduce."""
        return 0.0 if _NOTICE.at is None else 1.0

    def post(self, agreed: torch.Tensor) -> None:
        """Queue the host copy of the all-reduced notice count right behind the all-reduce (no wait)."""
        self._host.copy_(agreed, non_blocking=self._copied is not None)
        if self._copied is not None:
            self._copied.record()

    def agreed(self) -> bool:
        """Whether any rank had a notice at this step's start: the same answer on every rank, at the same step."""
        if self._copied is not None:
            self._copied.synchronize()
        return bool(self._host.item() > 0)

    @staticmethod
    def seconds_since_notice() -> float | None:
        return None if _NOTICE.at is None else time.monotonic() - _NOTICE.at
