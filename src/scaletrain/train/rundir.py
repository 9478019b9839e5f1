"""The run directory: checked before the first byte is written, then held by
one job at a time.

A job takes an exclusive ``flock`` on ``<dir>/.scaletrain.lock`` for its whole
life (the launcher holds it; workers it started inherit nothing and need
nothing). The kernel drops the lock when the holder dies, however it dies, so
a lock file that still names a process but can be locked again was left by a
dead job: it is taken over with a warning. The file also marks the directory
as a scaletrain run directory.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from scaletrain.checkpoint.paths import checkpoint_root
from scaletrain.errors import UserError, warn

LOCK_NAME = ".scaletrain.lock"
# What a scaletrain run directory holds (older runs have no lock file).
RUN_MARKERS = (LOCK_NAME, "config.toml", "metrics.jsonl", "summary.json", "checkpoints")
# Set by a launcher that holds the lock for the workers it starts.
LOCKED_ENV = "SCALETRAIN_RUN_DIR_LOCKED"


def check_run_dir(run_dir: Path, what: str = "--run-dir") -> None:
    """Refuse, before anything is written: an existing file, a non-empty
    directory that is not a run directory, a place we cannot write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{what} {run_dir} is a file, not a directory")
    if run_dir.is_dir():
        entries = sorted(p.name for p in run_dir.iterdir())
        if entries and not set(entries) & set(RUN_MARKERS):
            raise UserError(f"{what} {run_dir} is a non-empty directory that is not a scaletrain run directory "
                            f"(it holds {entries[0]!r}{' and more' if len(entries) > 1 else ''}); "
                            "choose a new or empty directory")
        if "config.toml" in entries and not set(entries) & (set(RUN_MARKERS) - {"config.toml"}):
            raise UserError(f"{what} {run_dir} holds a config.toml but no scaletrain run; choose a new or "
                            "empty directory")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {run_dir}: cannot write in {existing} (read-only file system or no permission)")


class UnwritableDir(UserError):
    """The directory to lock cannot be created."""


class RunDirLock:
    """An exclusive lock on a directory for the life of the job."""

    def __init__(self, directory: Path, what: str = "run directory"):
        self.directory, self.what = directory, what
        self.path = directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunDirLock":
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UnwritableDir(f"{self.what} {self.directory}: cannot create it ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"{self.what} {self.directory} is in use by {holder or 'another job'}") from None
        if previous := _read_holder(fd):
            warn(f"{self.what} {self.directory}: taking over the lock of {previous}, which is gone")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def check_free(self) -> None:
        """Refuse now if another job holds the lock, creating nothing."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{self.what} {self.directory} is in use by {_read_holder(fd) or 'another job'}") from None
        finally:
            os.close(fd)

    def release(self) -> None:
        """A clean end: empty the file (no stale holder) and unlock."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    return os.pread(fd, 256, 0).decode(errors="replace").strip()


def run_locks(cfg, run_dir: Path) -> list[RunDirLock]:
    """The run directory's lock, after the checkpoint directory's where that
    lies elsewhere (so that a checkpoint directory that cannot be made is
    found before the run directory exists)."""
    locks = [RunDirLock(run_dir)]
    checkpoint_dir = checkpoint_root(cfg, run_dir)
    if cfg.checkpoint.enable and not checkpoint_dir.absolute().is_relative_to(run_dir.absolute()):
        locks.insert(0, RunDirLock(checkpoint_dir, "checkpoint directory"))
    return locks


def lock_run(cfg, run_dir: Path) -> list[RunDirLock]:
    """Take every lock of :func:`run_locks`, or none. A checkpoint directory
    that cannot be created is refused unless checkpoint.on_error = continue
    (then the run trains on without checkpoints, each failed save said)."""
    taken: list[RunDirLock] = []
    try:
        for lock in run_locks(cfg, run_dir):
            try:
                taken.append(lock.acquire())
            except UnwritableDir as exc:
                if lock.directory == run_dir or cfg.checkpoint.on_error != "continue":
                    raise
                warn(f"{exc}; training continues without checkpoints (checkpoint.on_error = continue)")
    except UserError:
        for lock in taken:
            lock.release()
        raise
    return taken
