"""Parallelism applied to a plain model from outside (compose.py: ``parallelize``). Names
load on first use, so the launcher can check a layout (dims.py) without
importing FSDP, DTensor and pipelining."""

from scaletrain.lazy import lazy_getattr

_WHERE = {"ParallelDims": "dims", "ParallelModel": "compose", "parallelize": "compose",
          "build_optimizer": "compose", "clip_grad_norm": "compose", "canonical_name": "compose"}
__all__ = list(_WHERE)
__getattr__ = lazy_getattr(__name__, _WHERE)
