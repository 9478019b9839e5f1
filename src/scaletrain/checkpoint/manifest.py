"""Atomic checkpoint directories: written under a temporary name, fsynced,
sealed with a ``manifest.json`` (every file's size and SHA-256) written last,
then renamed into place. A directory without a valid manifest is never loaded."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp_dir: Path, final_dir: Path, info: dict) -> None:
    """fsync every file, write the manifest last, rename ``tmp_dir`` to ``final_dir``."""
    files = {}
    for path in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
        files[str(path.relative_to(tmp_dir))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest_tmp = tmp_dir / (MANIFEST + ".tmp")
    with manifest_tmp.open("w") as fh:
        json.dump({**info, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(manifest_tmp, tmp_dir / MANIFEST)
    _fsync_dir(tmp_dir)
    if final_dir.exists():  # a stale copy of the same step (e.g. after a restart)
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)


def verify(ckpt_dir: Path) -> str | None:
    """None when ``ckpt_dir`` is complete and intact, else what is wrong (naming the file)."""
    if not ckpt_dir.is_dir():
        return f"{ckpt_dir} is {'a file' if ckpt_dir.exists() else 'missing'}, not a checkpoint directory"
    manifest_path = ckpt_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        return f"{manifest_path} is missing (incomplete checkpoint)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{manifest_path} is not valid JSON"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{manifest_path} lists no files (a checkpoint holds at least its shards and train_state.json)"
    for name, expected in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its checksum (corrupted)"
    return None


def read_manifest(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / MANIFEST).read_text())


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)
