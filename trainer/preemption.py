"""A preemption notice becomes one last checkpoint: SIGTERM to any worker (a spot reclaim passed on by the pod's
preStop hook, a Kubernetes eviction, a SLURM preemption) makes the whole run save and commit at the end of the
current step, then stop, so Ray restarts it from that step as from any failure. A preempted run loses at most the
rest of a step instead of up to `checkpoint.every`.

The ranks agree after each step's last backward (a one-number all-reduce, before the update): a notice that came
before that point of step s stops the run at step s's end, one that came after it at step s+1's. The notice is
read where the device runs the all-reduce, not where the host queues it (on a GPU the host is up to a step ahead):
the handler sets a pinned host flag and the step copies it to the device right before the all-reduce. The result's
host copy is queued behind it and read at the step's end, so the host waits for the device's backward, never for
its update. A notice's worst case is then one step and one save (staging, write, commit); `check_grace` warns,
once, when the measured figures say `checkpoint.preempt_grace_s` cannot cover them. If the save is not committed
within the grace period of the signal, the process exits as a SIGTERM without this handler would have made it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from raylm.errors import RaylmError

log = logging.getLogger(__name__)


class Preempted(RaylmError):
    """The run stopped after a preemption notice, with its checkpoint committed; Ray restarts it from there."""


class _Notice:
    """The process's SIGTERM handler and what it saw: a signal handler belongs to the process, not to a run."""

    def __init__(self):
        self.at: float | None = None
        """time.monotonic() of the first SIGTERM."""
        self.flag: torch.Tensor | None = None
        """1.0 once noticed: what each step copies to the device and all-reduces (the run's `Preemption` sets it)."""
        self.grace_s = 0.0
        self.previous = None
        self.deadline: threading.Timer | None = None

    def handle(self, signum, frame) -> None:
        if self.at is not None:  # a second SIGTERM, or the grace period is over: exit as without this handler
            self.restore()
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.at = time.monotonic()  # said once the save is committed: Ray's own stops send SIGTERM too
        self.flag.fill_(1.0)
        self.deadline = threading.Timer(self.grace_s, os.kill, args=(os.getpid(), signal.SIGTERM))
        self.deadline.daemon = True
        self.deadline.start()

    def set(self) -> None:
        self.at, self.previous = None, signal.signal(signal.SIGTERM, self.handle)
        self.flag.zero_()

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
    """The ranks' agreement, step by step, on whether any of them got a preemption notice, and the check that the
    grace period covers a notice's worst case."""

    def __init__(self, device: torch.device, *, grace_s: float):
        _NOTICE.grace_s = self.grace_s = grace_s
        cuda = device.type == "cuda"
        self.device = device
        _NOTICE.flag = torch.zeros((), device="cpu", pin_memory=cuda)
        self._host = torch.zeros((), device="cpu", pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None
        self.warned = False

    def __enter__(self) -> "Preemption":
        _on_main_thread("set")
        return self

    def __exit__(self, *exc) -> None:
        _on_main_thread("restore")

    def exchange(self) -> None:
        """Queue the all-reduce of the ranks' notice flags and its host copy (no wait): after a step's last
        backward. The flag is copied from pinned memory, so the copy reads it when the device gets here."""
        agreed = _NOTICE.flag.to(self.device, non_blocking=self._copied is not None, copy=True)
        dist.all_reduce(agreed)
        self._host.copy_(agreed, non_blocking=self._copied is not None)
        if self._copied is not None:
            self._copied.record()

    def agreed(self) -> bool:
        """Whether any rank had a notice by this step's exchange: the same answer on every rank, at the same step."""
        if self._copied is not None:
            self._copied.synchronize()
        return bool(self._host.item() > 0)

    @staticmethod
    def seconds_since_notice() -> float | None:
        return None if _NOTICE.at is None else time.monotonic() - _NOTICE.at

    def check_grace(self, step_s: float | None, save_s: float | None, *, measured_by: str) -> None:
        """Warn once when a notice's worst case, one step (a notice just after a step's exchange waits for the next
        one's) and one save from its start to its commit, exceeds the grace period. None: not measured yet."""
        if self.warned or step_s is None or save_s is None or step_s + save_s <= self.grace_s:
            return
        self.warned = True
        log.warning("checkpoint.preempt_grace_s=%gs cannot cover a preemption notice: one step (%.2fs) + one save "
                    "to its commit (%.2fs) = %.2fs, as %s measured; raise --checkpoint.preempt_grace_s above that "
                    "and the platform's grace with it (KubeRay: terminationGracePeriodSeconds and the preStop wait "
                    "in cluster/kuberay/raycluster.yaml), or shorten the step (more workers) or the save (faster "
                    "checkpoint storage); saving less often does not help", self.grace_s, step_s, save_s,
                    step_s + save_s, measured_by)
