"""The trainer and its launcher; names load on first use."""

from scaletrain.lazy import lazy_getattr

_WHERE = {"Trainer": "trainer", "train": "launch"}
__all__ = list(_WHERE)
__getattr__ = lazy_getattr(__name__, _WHERE)
