"""What a worker does when something raises: one line for the user naming
the rank, where and why; the traceback in the run directory's log.

Two kinds of failure are told apart, because they need opposite handling:
- a rank's own error (a bug, a full disk, NaN in sampling): it is announced
  to the other ranks through the c10d store (the watchdog's) so that they
  stop at once instead of waiting in their next collective;
- a communication error (a peer died or vanished: gloo/NCCL raise): the
  watchdog diagnoses which rank and why (hang_report.json, exit 3).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from scaletrain.errors import describe_error

# gloo raises plain RuntimeErrors ("[.../gloo/transport/tcp/pair.cc] Connection
# closed by peer"); NCCL and the store raise DistError subclasses.
_COMM_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "socket timeout")


def is_communication_error(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _COMM_MARKERS)


def log_traceback(run_dir: Path | None, rank: int, exc: BaseException) -> Path | None:
    """Append the traceback to ``<run_dir>/logs/rank_<N>.log``; None when
    that cannot be written (full disk: then it goes to stderr)."""
    text = "".join(traceback.format_exception(exc))
    if run_dir is not None and run_dir.is_dir():
        path = run_dir / "logs" / f"rank_{rank}.log"
        try:
            path.parent.mkdir(exist_ok=True)
            with path.open("a") as fh:
                fh.write(text)
            return path
        except OSError:
            pass
    sys.stderr.write(text)
    return None


def failure_line(rank: int, where: str | None, exc: BaseException, log: Path | None) -> str:
    at = f" {where}" if where else ""
    tail = f" (traceback: {log})" if log else ""
    return f"rank {rank} failed{at}: {describe_error(exc)}{tail}"
