"""Stopping cleanly: SIGTERM / SIGINT become a flag the training loop checks
after each step, and the ranks agree to stop at the same step (a signal may
reach them at different ones) so they save one checkpoint together."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def agree_to_stop(runtime, local: bool) -> bool:
    """Stop when any rank asked to (one small all-reduce)."""
    if not runtime.distributed:
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
