"""Parallelism applied to a plain model from outside (compose.py: ``parallelize``). Names
load on first use, so the launcher can check a layout (dims.py) without
importing FSDP, DTensor and pipelining."""

from importlib import import_module

_WHERE = {"ParallelDims": "dims", "ParallelModel": "compose", "parallelize": "compose",
          "build_optimizer": "compose", "clip_grad_norm": "compose", "canonical_name": "compose"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"scaletrain.parallel.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'scaletrain.parallel' has no attribute {name!r}")
