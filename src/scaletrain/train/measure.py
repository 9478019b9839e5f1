"""Measuring one training step for the planner's proof (``debug.measure_step``):
the peak of live tensor bytes and the bytes of every collective, per rank.

Both come from the PyTorch profiler, so nothing in the step changes:
- memory: the profiler's allocation events (``profile_memory``); on CPU the
  peak is the bytes live when the step starts (parameters, optimizer states,
  buffers, counted from the tensors) plus the highest running sum of the
  step's allocations and frees; on CUDA it is the caching allocator's peak.
- collectives: every c10d dispatcher op (``c10d::allreduce_``,
  ``c10d::_allgather_base_``, ...; DTensor's functional collectives end in
  them too) is recorded with its input shapes. Bytes follow nccl-tests'
  message size: the full buffer of an all-reduce or broadcast, the gathered
  output of an all-gather, the input of a reduce-scatter, the tensor of a
  send/recv. The profiler records no element type for tensor-list
  arguments; those are counted as fp32 (the reduce dtype of every layout).
- saved activations: ``torch.autograd.graph.saved_tensors_hooks`` sees every
  tensor autograd keeps for backward; the peak of the distinct storages
  alive among them (parameters and views of parameters left out) is what
  the planner itemizes as activations. Not under activation checkpointing,
  whose own hooks keep what it saves.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict

import torch

# profiler dtype names -> bytes per element
_DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "int": 4, "long int": 8,
                "bool": 1, "unsigned char": 1, "signed char": 1, "short int": 2, "c10::Float8_e4m3fn": 1}

# op name -> (collective kind, index of the argument whose size is the message)
COLLECTIVE_OPS = {
    "c10d::allreduce_": ("all_reduce", 0),
    "c10d::allreduce_coalesced_": ("all_reduce", 0),
    "c10d::broadcast_": ("broadcast", 0),
    "c10d::_allgather_base_": ("all_gather", 0),
    "c10d::allgather_": ("all_gather", 0),
    "c10d::allgather_into_tensor_coalesced_": ("all_gather", 0),
    "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d::send": ("send", 0),
    "c10d::recv_": ("recv", 0),
    "c10d::reduce_": ("reduce", 0),
    "c10d::gather_": ("gather", 0),
    "c10d::alltoall_base_": ("all_to_all", 0),
}


def _numel(dims, is_list: bool) -> int:
    """Elements of one argument: a shape (``[]`` = a scalar) or a list of shapes."""
    if is_list:
        return sum(_numel(d, bool(d) and isinstance(d[0], list)) for d in dims)
    n = 1
    for d in dims:
        n *= d
    return n


class _Saved:
    """What a pack hook hands autograd: the tensor, and a weak reference
    target whose finalizer says when autograd let it go."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedBytes:
    """Peak bytes of distinct storages autograd holds for backward."""

    def __init__(self):
        self.refs: dict[int, int] = defaultdict(int)
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        local = getattr(t, "_local_tensor", t)  # a DTensor's shard holds its memory
        try:
            storage = local.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
            return t
        self.refs[ptr] += 1
        if self.refs[ptr] == 1:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        held = _Saved(t)
        weakref.finalize(held, self._release, ptr, nbytes)
        return held

    def _release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= nbytes

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Saved) else held


class StepProbe:
    """Context manager around one step; ``result()`` afterwards."""

    def __init__(self, device: torch.device, baseline_bytes: int, count_saved: bool = True):
        self.device, self.baseline = device, baseline_bytes
        self.profiler = None
        self.saved = SavedBytes() if count_saved else None
        self.hooks = None

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                                profile_memory=self.device.type == "cpu")
        self.profiler.__enter__()
        if self.saved is not None:
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self.saved.pack, self.saved.unpack)
            self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        if self.hooks is not None:
            self.hooks.__exit__(*exc)
        with contextlib.suppress(Exception):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.profiler.__exit__(*exc)
        return False

    def result(self) -> dict:
        events = sorted(self.profiler.profiler.kineto_results.events(), key=lambda e: e.start_ns())
        collectives: dict = defaultdict(lambda: {"calls": 0, "bytes": 0})
        running = peak = 0
        for e in events:
            name = e.name()
            if name == "[memory]":
                if str(e.device_type()).endswith("CPU"):
                    running += e.nbytes()
                    peak = max(peak, running)
                continue
            if name in COLLECTIVE_OPS:
                kind, arg = COLLECTIVE_OPS[name]
                dtype = e.dtypes()[arg]
                size = _numel(e.structured_input_shapes()[arg], dtype == "TensorList")
                collectives[kind]["calls"] += 1
                collectives[kind]["bytes"] += size * _DTYPE_BYTES.get(dtype, 4)
        if self.device.type == "cuda":
            peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            peak_bytes = self.baseline + peak
        out = {"peak_bytes": int(peak_bytes), "baseline_bytes": int(self.baseline),
               "collectives": {k: dict(v) for k, v in sorted(collectives.items())}}
        if self.saved is not None:
            out["saved_activation_peak_bytes"] = int(self.saved.peak)
        return out
