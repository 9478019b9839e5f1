"""Per-step metrics: memory peaks, achieved FLOP/s and MFU, and the
``metrics.jsonl`` writer."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

# Dense peak FLOP/s without sparsity, from the vendors' datasheets.
GPU_PEAK_FLOPS = {
    # name fragment: {dtype: peak}
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
}


def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """The device's dense peak for ``dtype``, or None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in GPU_PEAK_FLOPS.items():
        if fragment in name:
            return peaks[dtype] or None
    return None


def mem_peak_bytes(device: torch.device) -> int:
    """CUDA: the caching allocator's peak; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.file = path.open("a", buffering=1) if path is not None else None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
