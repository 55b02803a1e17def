"""Injected faults for tests and demos ([fault]): a rank that dies like a lost node, a preemption notice in the
middle of a step, a slowed step. Each fires once per run directory (a marker file there), so the restarted run
goes through the same step and shows the recovery."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

from raylm import storage
from raylm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FaultConfig:
    kill_at_step: int = 0
    """Tests and demos: rank fault.rank dies hard (os._exit) after this step, once per run dir (0 = never)."""
    rank: int = 0
    """The rank that dies (kill_at_step) or gets the notice (sigterm_at_step)."""
    step_delay_s: float = 0.0
    """Tests and demos: every rank sleeps this long after each step, so a run lasts long enough to remove a node,
    send a preemption notice or add a node back by hand and watch it recover."""
    sigterm_at_step: int = 0
    """Tests and demos: rank fault.rank sends itself SIGTERM (a preemption notice) during this step, after its first
    micro-batch's backward, once per run dir (0 = never)."""
    rollout_kill_at_step: int = 0
    """Tests and demos (python -m trainer.rl): a rollout actor's process dies hard during this step's rollouts,
    once per run dir (0 = never); Ray restarts it and its prompts are redone."""

    def __post_init__(self):
        values = (self.kill_at_step, self.rank, self.step_delay_s, self.sigterm_at_step, self.rollout_kill_at_step)
        if min(values) < 0:
            raise ConfigError(f"fault.kill_at_step, fault.rank, fault.step_delay_s, fault.sigterm_at_step and "
                              f"fault.rollout_kill_at_step must be >= 0, got {', '.join(map(str, values))}")


def _first_time(run_dir: str, name: str, what: str) -> bool:
    """Whether a fault is injected for the first time in this run dir (then marked there, so a restarted run that
    reaches the step again runs through it)."""
    marker = storage.join(run_dir, name)
    if storage.exists(marker):
        return False
    storage.write_bytes(marker, f"{what}\n".encode())
    return True


def inject_fault(fault: FaultConfig, *, run_dir: str, step: int, rank: int) -> None:
    """Slow the step down as configured, and die like a lost node at the configured step, once: a marker in the run
    dir stops it after the restart."""
    if fault.step_delay_s:
        time.sleep(fault.step_delay_s)
    if fault.kill_at_step != step or fault.rank != rank:
        return
    if not _first_time(run_dir, f"fault-injected-step-{step:06d}", f"rank {rank} killed at step {step}"):
        return
    log.warning("fault injection: rank %d exits at step %d", rank, step)
    logging.shutdown()
    os._exit(1)


def notice_fault(fault: FaultConfig, *, run_dir: str, step: int, rank: int) -> Callable[[int], None] | None:
    """The `after_backward` hook of step `step` (counted from 1, as it is saved) that sends this rank a preemption
    notice in the middle of the step, when configured; None otherwise."""
    if fault.sigterm_at_step != step or fault.rank != rank:
        return None

    def signal_self(micro_batch: int) -> None:
        if micro_batch == 0 and _first_time(run_dir, f"fault-sigterm-step-{step:06d}",
                                            f"rank {rank} sent itself SIGTERM in step {step}"):
            log.warning("fault injection: rank %d sends itself SIGTERM in step %d", rank, step)
            os.kill(os.getpid(), signal.SIGTERM)

    return signal_self


def inject_rollout_fault(fault: FaultConfig, *, run_dir: str, step: int) -> None:
    """In a rollout actor: die like a lost node during step `step`'s rollouts when configured, once per run dir."""
    if fault.rollout_kill_at_step != step or not _first_time(run_dir, f"fault-rollout-step-{step:06d}",
                                                             f"a rollout actor killed in step {step}"):
        return
    log.warning("fault injection: a rollout actor exits during step %d", step)
    logging.shutdown()
    os._exit(1)
