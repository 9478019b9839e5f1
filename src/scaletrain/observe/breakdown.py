"""Where a step's time goes, per rank, and what the rank uses.

How each phase is measured (wall-clock seconds of the training thread; on
CUDA with events recorded around each phase and read once the step has
synchronized, so no extra device synchronization is added):
- ``data_s``: sampling the batch and moving it to the device;
- ``forward_s`` / ``backward_s``: the model's forward (with the loss) and
  backward of every micro-step. Communication that runs inside backward
  (DDP's bucketed all-reduce, FSDP's reduce-scatter and prefetched
  all-gathers) counts here when it overlaps compute, and its unhidden tail
  too: DDP and FSDP wait for their last reduction before backward returns;
- ``optimizer_s``: unscale, the optimizer step and zeroing gradients;
- ``comm_wait_s``: the blocking collectives the loop itself issues, where the
  rank can only wait for the others: the gradient-norm all-reduce and the
  loss all-reduce (a straggler's peers show their wait here);
- ``other_s``: the rest of the step (scheduler, bookkeeping).
Resources: resident set (psutil), the CUDA caching allocator's allocated
and reserved bytes, this process's CPU utilisation over the step interval
(CPU seconds / wall seconds / cores it may use) and, with NVML, the GPU's.
Per rank these are gathered to rank 0 with the straggler check's one small
all-gather, every ``logging.interval`` steps.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import psutil
import torch

PHASES = ("data_s", "forward_s", "backward_s", "optimizer_s", "comm_wait_s")
RESOURCES = ("rss_bytes", "mem_allocated_bytes", "mem_reserved_bytes", "cpu_util", "gpu_util")
ROW = ("step_time_s", *PHASES, "other_s", "first_forward_s", *RESOURCES)


class StepTimer:
    """Phase times of one step: ``with timer.phase("forward_s"): ...``."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda, self.enabled = device.type == "cuda", enabled
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.pending: list[tuple[str, object, object]] = []  # CUDA event pairs read at finish()

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.pending.clear()

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
            return
        started = time.perf_counter()
        yield
        self.totals[name] += time.perf_counter() - started

    def finish(self, step_time_s: float) -> dict[str, float]:
        """The step's phases (call after the step synchronized)."""
        for name, start, end in self.pending:
            self.totals[name] += start.elapsed_time(end) / 1000
        self.pending.clear()
        out = dict(self.totals)
        out["other_s"] = max(0.0, step_time_s - sum(out.values()))
        out["step_time_s"] = step_time_s
        return out


class ResourceSampler:
    """Memory and utilisation of this process (and its GPU) since the last sample."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self.process = psutil.Process()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.last = (time.perf_counter(), self._cpu_seconds())

    def _cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def sample(self) -> dict[str, float | None]:
        if not self.enabled:
            return dict.fromkeys(RESOURCES)
        now, cpu = time.perf_counter(), self._cpu_seconds()
        wall = now - self.last[0]
        util = (cpu - self.last[1]) / wall / self.cores if wall > 0 else None
        self.last = (now, cpu)
        out = {"rss_bytes": float(self.process.memory_info().rss), "cpu_util": util,
               "mem_allocated_bytes": None, "mem_reserved_bytes": None, "gpu_util": None}
        if self.device.type == "cuda":
            out["mem_allocated_bytes"] = float(torch.cuda.memory_allocated(self.device))
            out["mem_reserved_bytes"] = float(torch.cuda.memory_reserved(self.device))
            with contextlib.suppress(Exception):  # NVML (pynvml) may be missing
                out["gpu_util"] = torch.cuda.utilization(self.device) / 100
        return out


def mean_phases(steps: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each timed field over the steps of one logging interval."""
    keys = ("step_time_s", *PHASES, "other_s")
    return {k: sum(s[k] for s in steps) / len(steps) for k in keys} if steps else dict.fromkeys(keys, 0.0)


def to_vector(row: dict) -> list[float]:
    """A row as floats for the all-gather (NaN for None)."""
    return [float("nan") if row.get(k) is None else float(row[k]) for k in ROW]


def from_vector(values: list[float], step: int, rank: int) -> dict:
    row = {"step": step, "rank": rank}
    row.update({k: (None if v != v else v) for k, v in zip(ROW, values)})  # NaN -> None
    return row


def gather_rows(runtime, row: dict, step: int) -> list[dict]:
    """Every rank's row on every rank: one all-gather of a few floats."""
    if not runtime.distributed:
        return [{"step": step, "rank": runtime.rank, **row}]
    from scaletrain.parallel.runtime import all_gather_single

    local = torch.tensor(to_vector(row), dtype=torch.float64, device=runtime.device)
    gathered = torch.empty(runtime.world_size * len(local), dtype=torch.float64, device=runtime.device)
    all_gather_single(gathered, local)
    return [from_vector(v, step, r) for r, v in enumerate(gathered.view(runtime.world_size, -1).tolist())]


def find_stragglers(rows: list[dict], factor: float) -> list[dict]:
    """Ranks whose data + first-forward time (measured before gradient
    synchronization makes the ranks wait for each other) exceeds the median
    by ``factor``."""
    times = [r["first_forward_s"] or 0.0 for r in rows]
    median = statistics.median(times) if times else 0.0
    if factor <= 0 or median <= 0:
        return []
    return [{"rank": r["rank"], "forward_s": t, "ratio": t / median} for r, t in zip(rows, times)
            if t > factor * median]
