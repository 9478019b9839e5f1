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
    def __init__(self, spec: str, rank: int, device: torch.device):
        self.kind, self.rank, self.step = parse_fault(spec) if spec else (None, -1, 0)
        self.mine = self.kind is not None and rank == self.rank
        self.device = device
        self.fired = False

    def _now(self, step: int, kind: str) -> bool:
        return self.mine and self.kind == kind and step == self.step

    def at(self, point: str, step: int) -> None:
        """Act at ``point`` ("start" or "after_loss") of ``step`` (1-based)."""
        if not self.mine or step < self.step:
            return
        if point == "start" and self.kind == "slow":
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
        if self._now(step, "nan") and not self.fired:
            self.fired = True
            return True
        return False

    def last_step(self, steps: int) -> int:
        """``fewer_batches:RANK:STEP``: this rank's data runs out one batch early."""
        return self.step - 1 if self.mine and self.kind == "fewer_batches" else steps
