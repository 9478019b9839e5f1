"""Package namespaces that import a name's module on first use, so that
light entry points (the launcher's config checks) skip FSDP, DTensor, DCP."""

from __future__ import annotations

from importlib import import_module


def lazy_getattr(package: str, where: dict[str, str]):
    """A module ``__getattr__`` (PEP 562) resolving ``name`` from ``package.where[name]``."""

    def __getattr__(name: str):
        if name in where:
            return getattr(import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
