"""Exact-match response cache (LiteLLM's cache, keyed the same way): the
endpoint, model, prompt or messages and every sampling parameter. Only
deterministic requests are cached: temperature 0 (greedy) or a fixed
``seed``. Entries expire after ``ttl_s``; past ``max_bytes`` the least
recently used go first. A streamed response is stored as its SSE bytes once
it has ended with ``[DONE]`` and is replayed as a stream.

``Cache-Control: no-cache`` in the request skips the lookup (the fresh answer
is stored); ``no-store`` skips both."""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

# Fields that do not change the answer's content.
_IGNORED = ("user", "stream_options")


def cache_key(path: str, body: dict, version: str = "") -> str | None:
    """The key of a deterministic request, or None when its answer may vary.
    ``version`` names the weights behind the model (the checkpoints the
    backends serve), so that a roll to a new checkpoint misses the old answers."""
    temperature = body.get("temperature", 1.0)
    if not (temperature == 0 or body.get("seed") is not None):
        return None
    kept = {k: v for k, v in body.items() if k not in _IGNORED}
    if body.get("stream") and (body.get("stream_options") or {}).get("include_usage"):
        kept["include_usage"] = True  # a different event sequence
    canonical = json.dumps([path, version, kept], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def cache_directives(header: str | None) -> tuple[bool, bool]:
    """(may read, may store) from a request's Cache-Control header."""
    parts = {p.strip().lower() for p in (header or "").split(",")}
    if "no-store" in parts:
        return False, False
    return "no-cache" not in parts, True


@dataclass
class _Entry:
    body: bytes
    media_type: str
    stored_at: float


class ResponseCache:
    def __init__(self, max_bytes: int = 64 << 20, ttl_s: float = 600.0):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0

    def get(self, key: str, now: float | None = None) -> _Entry | None:
        now = time.monotonic() if now is None else now
        entry = self.entries.get(key)
        if entry is None:
            return None
        if now - entry.stored_at > self.ttl_s:
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: str, body: bytes, media_type: str, now: float | None = None) -> None:
        if len(body) > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = _Entry(body, media_type, time.monotonic() if now is None else now)
        self.bytes += len(body)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: str) -> None:
        self.bytes -= len(self.entries.pop(key).body)
