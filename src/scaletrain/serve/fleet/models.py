"""Several models in one engine replica, loaded on first use and evicted
least recently used past a memory budget (Ray Serve's
``@serve.multiplexed(max_num_models_per_replica=...)``, with a byte budget
instead of a count, because models differ in size).

A load runs in a worker thread (the event loop keeps serving the loaded
models) and ends with a warm-up forward; loads are one at a time. Before a
load, idle models are evicted (oldest use first) until the newcomer's
estimated size fits; after it, again with its measured size. A model with
requests in flight is never evicted, so the budget can be exceeded while
every loaded model is busy."""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(eq=False)
class LoadedEntry:
    name: str
    app: object  # the ASGI app of this model's engine (serve/api.py)
    nbytes: int  # weights + KV cache
    close: Callable[[], None]
    registry: object = None  # its Prometheus registry
    in_flight: int = 0


def disk_bytes(path: str) -> int:
    """Size of a model's files: the first estimate of its size in memory."""
    root = Path(path)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


class ModelPool:
    def __init__(self, paths: dict[str, str], budget_bytes: int, build: Callable[[str, str], LoadedEntry],
                 estimate: Callable[[str], int] = disk_bytes):
        self.paths, self.budget_bytes, self.build, self.estimate = paths, budget_bytes, build, estimate
        self.loaded: OrderedDict[str, LoadedEntry] = OrderedDict()  # least recently used first
        self.sizes: dict[str, int] = {}  # measured at the last load
        self.loads: dict[str, int] = {}
        self.loading: set[str] = set()
        self.evictions: list[str] = []  # names, in order
        self._lock = asyncio.Lock()
        self.on_load: Callable[[str], None] = lambda name: None
        self.on_evict: Callable[[str], None] = lambda name: None

    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self.loaded.values())

    async def acquire(self, name: str) -> LoadedEntry:
        """The loaded model (loading it first), counted as in flight until ``release``."""
        entry = self.loaded.get(name)
        if entry is None:
            async with self._lock:
                entry = self.loaded.get(name)
                if entry is None:
                    need = self.sizes.get(name) or self.estimate(self.paths[name])
                    self._evict(reserve=need)
                    self.loading.add(name)
                    try:
                        entry = await asyncio.to_thread(self.build, name, self.paths[name])
                    finally:
                        self.loading.discard(name)
                    self.loaded[name] = entry
                    self.sizes[name] = entry.nbytes
                    self.loads[name] = self.loads.get(name, 0) + 1
                    self.on_load(name)
        self.loaded.move_to_end(name)
        entry.in_flight += 1
        self._evict()
        return entry

    def release(self, entry: LoadedEntry) -> None:
        entry.in_flight -= 1
        self._evict()

    def _evict(self, reserve: int = 0) -> None:
        while self.used_bytes() + reserve > self.budget_bytes:
            victim = next((e for e in self.loaded.values() if e.in_flight == 0), None)
            if victim is None:
                return
            del self.loaded[victim.name]
            self.evictions.append(victim.name)
            self.on_evict(victim.name)
            print(f"evicted model {victim.name} ({victim.nbytes / 2**20:.1f} MiB; budget "
                  f"{self.budget_bytes / 2**20:.1f} MiB)", file=sys.stderr, flush=True)
            victim.close()
