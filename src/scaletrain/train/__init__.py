from importlib import import_module

_WHERE = {"Trainer": "trainer", "train": "launch"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"scaletrain.train.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'scaletrain.train' has no attribute {name!r}")
