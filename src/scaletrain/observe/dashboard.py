"""``scaletrain dashboard``: live curves of one or more run directories in
the browser.

The server only reads the run directory's files (the contract in
ARCHITECTURE.md), so it works on a finished run, a running one, or a copy
rsynced from a cluster; it never writes there and never takes the run's
lock. Each ``*.jsonl`` stream is tailed incrementally: an index of line
offsets is kept, not the rows, so a long run costs 8 bytes per line of
server memory, and a client asks for rows from a cursor (``since``) on. A
line still being written (no newline yet) is not served until it is
complete. When a file is replaced or shrinks (the trainer rewrites
``metrics.jsonl`` after a resume) the stream's generation changes and
clients start that stream over.

Checkpoint validity is :func:`scaletrain.checkpoint.manifest.verify`, which
hashes every file: it runs on one background thread, once per manifest
version, and the list says "checking" meanwhile.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
import tomllib
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from scaletrain.checkpoint.manifest import MANIFEST, read_manifest, step_dirs, verify
from scaletrain.errors import UserError
from scaletrain.train.rundir import LOCK_NAME, RUN_MARKERS

STREAMS = {"metrics": "metrics.jsonl", "ranks": "ranks.jsonl", "alerts": "alerts.jsonl", "events": "events.jsonl"}
MAX_ROWS = 20_000  # per response; a client catching up on a long run asks again
_READ_BLOCK = 1 << 22
STATIC = Path(__file__).parent / "static"


def clean(value):
    """JSON the browser can parse: NaN and infinities (Python's json writes
    them as bare tokens) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


class JsonlTail:
    """Rows of a growing JSON-lines file, by index, read on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.gen = 0
        self._inode: int | None = None
        self._starts = array("q")  # byte offset of each complete, non-empty line
        self._end = 0  # just past the last complete line
        self._lock = threading.Lock()

    def _reset(self, inode: int | None) -> None:
        self.gen += 1
        self._inode, self._starts, self._end = inode, array("q"), 0

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._inode is not None:
                self._reset(None)
            return
        if st.st_ino != self._inode or st.st_size < self._end:
            self._reset(st.st_ino)
        with open(self.path, "rb") as fh:
            fh.seek(self._end)
            pending = b""  # the unfinished line at a block's end, completed by the next block
            while block := fh.read(_READ_BLOCK):
                pending += block
                pending = pending[self._index(pending):]

    def _index(self, data: bytes) -> int:
        """Index the complete lines of ``data`` (which starts at ``_end``); bytes consumed."""
        pos = 0
        while (newline := data.find(b"\n", pos)) >= 0:
            if data[pos:newline].strip():
                self._starts.append(self._end + pos)
            pos = newline + 1
        self._end += pos
        return pos

    def read(self, since: int = 0, limit: int = MAX_ROWS, gen: int | None = None) -> dict:
        """Rows ``since`` (negative: counted from the end) up to ``limit``;
        from the start, with ``reset``, when the client's ``gen`` is stale."""
        with self._lock:
            self._refresh()
            total = len(self._starts)
            reset = gen is not None and gen != self.gen
            if reset:
                since = 0
            start = max(0, total + since) if since < 0 else min(since, total)
            stop = min(total, start + max(0, limit))
            lines = self._lines(start, stop)
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:  # a corrupt line: skip it, the cursor still moves past it
                continue
            if isinstance(row, dict):
                rows.append(clean(row))
        return {"gen": self.gen, "reset": reset, "rows": rows, "next": stop, "total": total}

    def _lines(self, start: int, stop: int) -> list[bytes]:
        if start >= stop:
            return []
        end = self._starts[stop] if stop < len(self._starts) else self._end
        with open(self.path, "rb") as fh:
            fh.seek(self._starts[start])
            return fh.read(end - self._starts[start]).splitlines()


def read_json(path: Path):
    """A JSON document, or None while it is missing or half written."""
    try:
        return clean(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


class CheckpointChecker:
    """verify() of each checkpoint version on one background thread, cached."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self._results: dict[tuple, Future] = {}
        self._lock = threading.Lock()

    def describe(self, step: int, path: Path) -> dict:
        try:
            st = (path / MANIFEST).stat()
            key = (str(path), st.st_mtime_ns, st.st_size)
        except FileNotFoundError:  # still being written (the manifest comes last) or broken
            return {"step": step, "name": path.name, "valid": False, "problem": verify(path),
                    "bytes": None, "time": None}
        with self._lock:
            if key not in self._results:
                self._results[key] = self._pool.submit(verify, path)
            future = self._results[key]
        problem = future.result() if future.done() else None
        return {"step": step, "name": path.name, "valid": future.done() and problem is None,
                "checking": not future.done(), "problem": problem,
                "bytes": _manifest_bytes(path), "time": st.st_mtime}


def _manifest_bytes(path: Path) -> int | None:
    try:
        return sum(f["bytes"] for f in read_manifest(path)["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class Run:
    """One run directory as the dashboard sees it."""

    def __init__(self, path: Path, checker: CheckpointChecker):
        self.path, self.checker = path, checker
        self.streams = {name: JsonlTail(path / file) for name, file in STREAMS.items()}

    def info(self) -> dict:
        # Seconds since metrics.jsonl last grew, by the server's clock (a remote browser's may differ).
        written_at = _mtime(self.path / STREAMS["metrics"])
        idle_s = None if written_at is None else time.time() - written_at
        return {"name": self.path.name, "path": str(self.path), "state": self.state(), "idle_s": idle_s}

    def state(self) -> str:
        """running / hung / finished / stopped early / incomplete (ended without a summary)."""
        if _lock_holder_alive(self.path / LOCK_NAME):  # also a resumed run that had hung or finished before
            return "running"
        summary = read_json(self.path / "summary.json")
        hang_at, summary_at = _mtime(self.path / "hang_report.json"), _mtime(self.path / "summary.json")
        if hang_at is not None and (summary is None or hang_at >= (summary_at or 0)):
            return "hung"
        if summary is not None:
            return "stopped early" if summary.get("stopped_early") else "finished"
        return "incomplete"

    def status(self) -> dict:
        """The run's small documents: summary, config, hang report, checkpoints."""
        config = self.path / "config.toml"
        config_text = config.read_text(errors="replace") if config.exists() else None
        root = _checkpoint_root(self.path, config_text)
        return {**self.info(), "summary": read_json(self.path / "summary.json"), "config": config_text,
                "hang_report": read_json(self.path / "hang_report.json"),
                "checkpoints": [self.checker.describe(s, p) for s, p in step_dirs(root)]}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _checkpoint_root(run_dir: Path, config_text: str | None) -> Path:
    """checkpoint.dir of the run's resolved config, else <run>/checkpoints
    (as scaletrain.checkpoint.paths.checkpoint_root, without loading the
    whole config, which may be a newer or older schema than this one)."""
    try:
        configured = tomllib.loads(config_text or "").get("checkpoint", {}).get("dir")
    except tomllib.TOMLDecodeError:
        configured = None
    return Path(configured).expanduser() if configured else run_dir / "checkpoints"


def _lock_holder_alive(lock: Path) -> bool:
    """The lock file names its holder ("pid N on HOST") while a job runs and
    is emptied at a clean end; reading it never touches the lock itself."""
    try:
        words = lock.read_text().split()
    except OSError:
        return False
    if len(words) < 4 or words[0] != "pid" or words[3] != socket.gethostname():
        return len(words) >= 4  # another host's job: trust the file
    try:
        os.kill(int(words[1]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


class RunSet:
    """The runs named on the command line; a directory that holds run
    directories (like ``runs/``) contributes each, new ones as they appear.
    Indices are stable: runs are only ever appended."""

    def __init__(self, paths: list[Path]):
        self.roots: list[Path] = []
        self.runs: list[Run] = []
        self._known: set[Path] = set()
        self._checker = CheckpointChecker()
        self._lock = threading.Lock()
        for path in paths:
            self._add_root(path)

    def _add_root(self, path: Path) -> None:
        if not path.exists():
            raise UserError(f"RUN_DIR {path} does not exist")
        if not path.is_dir():
            raise UserError(f"RUN_DIR {path} is a file, not a run directory")
        if is_run_dir(path):
            self._add_run(path)
        elif _child_runs(path) or not any(path.iterdir()):
            # A folder of runs (like runs/), or an empty one a run is about to fill: watched.
            self.roots.append(path)
            self._scan(path)
        else:
            raise UserError(f"RUN_DIR {path} is not a scaletrain run directory (none of "
                            f"{', '.join(RUN_MARKERS)}), holds none and is not empty")

    def _add_run(self, path: Path) -> None:
        resolved = path.resolve()
        if resolved not in self._known:
            self._known.add(resolved)
            self.runs.append(Run(path, self._checker))

    def _scan(self, root: Path) -> None:
        for run in [root] if is_run_dir(root) else _child_runs(root):
            self._add_run(run)

    def current(self) -> list[Run]:
        with self._lock:
            for root in self.roots:
                self._scan(root)
            return list(self.runs)

    def get(self, index: int) -> Run:
        runs = self.current()
        if not 0 <= index < len(runs):
            from fastapi import HTTPException

            raise HTTPException(404, f"no run {index}; there are {len(runs)}")
        return runs[index]


def _child_runs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if is_run_dir(p))
    except OSError:
        return []


def make_app(runs: RunSet):
    from fastapi import FastAPI, Query
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="scaletrain dashboard", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    def list_runs() -> list[dict]:
        return [{"index": i, **run.info()} for i, run in enumerate(runs.current())]

    @app.get("/api/runs/{index}/status")
    def run_status(index: int) -> dict:
        return runs.get(index).status()

    def stream(name: str):
        def read(index: int, since: int = 0, limit: int = Query(MAX_ROWS, ge=0, le=MAX_ROWS),
                 gen: int | None = None) -> dict:
            return runs.get(index).streams[name].read(since, limit, gen)

        read.__name__ = f"read_{name}"
        return read

    for name in STREAMS:
        app.get(f"/api/runs/{{index}}/{name}")(stream(name))
    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so that a bad
    address or a busy port is one error line, and port 0 picks a free port."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number (0..65535; 0 picks a free one)")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host!r} cannot be resolved ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(128)
    return sock


def serve(run_dirs: list[Path], host: str = "127.0.0.1", port: int = 8050) -> int:
    import uvicorn

    if not run_dirs:
        if not Path("runs").is_dir():
            raise UserError("no RUN_DIR given and there is no ./runs directory (the default parent of run "
                            "directories); name one or more run directories")
        run_dirs = [Path("runs")]
    runs = RunSet(run_dirs)
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(make_app(runs), log_level="warning", access_log=False))
    # Ctrl-C and SIGTERM stop the server gracefully, exit 0, also when they come before uvicorn
    # installs its own handlers (it re-raises the signal to these after its shutdown).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True))
    shown = f"[{host}]" if ":" in host else host
    print(f"dashboard of {len(runs.runs)} run(s) on http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C stops it)",
          flush=True)
    server.run(sockets=[sock])
    return 0
