"""DCP's reader without arbitrary unpickling.

DCP stores its ``.metadata`` file with pickle and reads it with a plain
``pickle.load``; the tensor files are already read with
``torch.load(weights_only=True)``. ``SafeReader`` reads the metadata with an
unpickler that resolves only DCP's own metadata classes, torch.Size, torch
dtypes and layouts, and paths, so a tampered checkpoint raises
``UnsafeCheckpoint`` instead of running code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from scaletrain.errors import UserError

_ALLOWED_MODULE_PREFIX = "torch.distributed.checkpoint."
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
            ("pathlib", "PureWindowsPath")}


class UnsafeCheckpoint(UserError):
    """A checkpoint whose metadata names code to run: reported, never loaded."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith(_ALLOWED_MODULE_PREFIX) and not name.startswith("__"):
            found = super().find_class(module, name)
            if isinstance(found, type) or name == "_MEM_FORMAT_ENCODING":
                return found
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpoint(f"refusing to unpickle {module}.{name}: not part of DCP's metadata "
                               "(a tampered or foreign checkpoint)")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as fh:
            try:
                metadata = _Unpickler(fh).load()
            except UnsafeCheckpoint as exc:
                raise UnsafeCheckpoint(f"{path}: {exc}") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
