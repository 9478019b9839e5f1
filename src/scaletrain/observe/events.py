"""The run's failure history: ``events.jsonl``, one JSON object per event
(``time``, ``step``, ``kind``, ``rank``, ``detail``): restarts, hangs,
skipped steps, rollbacks, failed saves. Appended with one ``write`` per line
on an O_APPEND descriptor, so several ranks can add to it without
interleaving."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from scaletrain.observe.recorder import read_records

EVENTS_FILE = "events.jsonl"


def append_event(run_dir: Path, kind: str, step: int, rank: int, detail: str, **extra) -> None:
    line = json.dumps({"time": time.time(), "step": step, "kind": kind, "rank": rank, "detail": detail,
                       **extra}) + "\n"
    try:
        fd = os.open(run_dir / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:  # an unwritable run directory already reports itself elsewhere
        return
    try:
        os.write(fd, line.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def read_events(run_dir: Path) -> list[dict]:
    return read_records(run_dir / EVENTS_FILE)
