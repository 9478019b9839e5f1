"""Per-step metrics: memory peaks and limits, achieved FLOP/s and MFU."""

from __future__ import annotations

import os
import resource
import sys

import torch

def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """The device's dense peak for ``dtype`` from the planner's hardware
    catalog, or None where unknown (CPUs, unlisted GPUs, no bf16)."""
    if device.type != "cuda":
        return None
    from scaletrain.planner.hardware import device_for_cuda_name

    entry = device_for_cuda_name(torch.cuda.get_device_name(device))
    return (entry.peak_flops(dtype) or None) if entry else None


def mem_peak_bytes(device: torch.device) -> int:
    """CUDA: the caching allocator's peak; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def memory_limit_bytes(device: torch.device) -> int | None:
    """What this process may use at most: the GPU's memory, or on CPU the
    cgroup limit or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    from scaletrain.train.preflight import cgroup_memory

    if (cgroup := cgroup_memory()) is not None:
        return cgroup[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
