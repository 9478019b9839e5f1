"""Fault injection (``debug.inject_fault = KIND:RANK:STEP``): the classic
ways a distributed job hangs or fails, on one rank at one step, so that the
hang diagnosis, the failure path and self-healing can be tested for real."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from scaletrain.config import parse_fault


class InjectedError(RuntimeError):
    """debug.inject_fault = swallow_exception:RANK:STEP (caught by the loop: the classic bug)."""


class FaultInjector:
    """Every ``KIND:RANK:STEP`` of a comma-separated spec that names this rank."""

    def __init__(self, spec: str, rank: int, device: torch.device):
        faults = [parse_fault(part) for part in spec.split(",") if part]
        self.mine = [(kind, step) for kind, r, step in faults if r == rank]
        self.rank, self.device = rank, device
        self.fired: set[tuple[str, int]] = set()

    def _now(self, step: int, kind: str) -> bool:
        return (kind, step) in self.mine

    def at(self, point: str, step: int) -> None:
        """Act at ``point`` ("start" or "after_loss") of ``step`` (1-based)."""
        if point == "start" and any(kind == "slow" and step >= at for kind, at in self.mine):
            time.sleep(0.2)
        elif point == "start" and self._now(step, "sleep"):
            time.sleep(3600)
        elif point == "start" and self._now(step, "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif point == "start" and self._now(step, "swallow_exception"):
            raise InjectedError(f"injected failure on rank {self.rank} at step {step}")
        elif point == "start" and self._now(step, "raise"):
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step}")
        elif point == "after_loss" and self._now(step, "extra_collective"):
            dist.all_reduce(torch.zeros(1, device=self.device))  # only this rank calls it

    def nan_loss(self, step: int) -> bool:
        """``nan:RANK:STEP``: this rank's loss is NaN at that step, once (a bad
        batch: after a rollback the step number comes again, the batch not)."""
        if self._now(step, "nan") and ("nan", step) not in self.fired:
            self.fired.add(("nan", step))
            return True
        return False

    def oom(self, step: int, micro_batch_size: int) -> None:
        """``oom:RANK:STEP``: an out-of-memory error in that step's forward, as
        long as the micro batch is above 1 (halving it is the cure)."""
        if self._now(step, "oom") and micro_batch_size > 1:
            raise torch.OutOfMemoryError(f"injected out of memory on rank {self.rank} at step {step} "
                                         f"(micro batch {micro_batch_size})")

    def last_step(self, steps: int) -> int:
        """``fewer_batches:RANK:STEP``: this rank's data runs out one batch early."""
        return min([at - 1 for kind, at in self.mine if kind == "fewer_batches"] + [steps])
