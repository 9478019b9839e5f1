"""Rank 0's record of a run: ``metrics.jsonl`` (one object per logged step),
``ranks.jsonl`` (one object per rank per logged step: the time breakdown and
resources of ``observe.breakdown``), the exporters and the alert rules."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

FILES = ("metrics.jsonl", "ranks.jsonl")


def build_recorder(cfg, run_dir: Path, enabled: bool) -> "Recorder":
    """Rank 0's recorder with the configured alert rules and exporters; other ranks' records nothing."""
    if not enabled:
        return Recorder(run_dir, enabled=False)
    from scaletrain.observe.alerts import AlertEngine, build_sinks, parse_rules
    from scaletrain.observe.exporters import build_exporters

    alerts = AlertEngine(parse_rules(cfg.alerts), build_sinks(run_dir, cfg.logging.alert_webhook or None))
    # A resumed run: the rules' windows refill from the kept records; alerts still firing stay so.
    alerts.restore(run_dir / "alerts.jsonl", read_records(run_dir / "metrics.jsonl"))
    values = dataclasses.asdict(cfg.logging)
    exporters = build_exporters(values, run_dir, alerts.severities(), wandb_config=cfg.to_dict())
    return Recorder(run_dir, enabled=True, exporters=exporters, alerts=alerts)


class Recorder:
    """Writes the records; on each, evaluates the alert rules (their sinks:
    the log, alerts.jsonl, a webhook) and feeds the exporters."""

    def __init__(self, run_dir: Path, enabled: bool, exporters: list | None = None, alerts=None):
        self.run_dir, self.enabled = run_dir, enabled
        self.exporters, self.alerts = exporters or [], alerts
        self.files = {}
        if enabled:
            self._open()

    def _open(self) -> None:
        self.files = {name: (self.run_dir / name).open("a", buffering=1) for name in FILES}

    def log(self, record: dict, rows: list[dict], now: float) -> None:
        """One logged step: its record and every rank's row."""
        if not self.enabled:
            return
        self.files["metrics.jsonl"].write(json.dumps(record) + "\n")
        self.files["ranks.jsonl"].write("".join(json.dumps(row) + "\n" for row in rows))
        firing = {}
        if self.alerts is not None:
            self.alerts.observe(record, now)
            firing = self.alerts.firing()
        for exporter in self.exporters:
            exporter.write(record, rows, firing)

    def truncate(self, step: int) -> None:
        """Forget the records of steps after ``step`` (a resume or a rollback)."""
        if not self.enabled:
            return
        self.close_files()
        truncate_records(self.run_dir, step)
        self._open()

    def close_files(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}

    def close(self) -> None:
        self.close_files()
        for exporter in self.exporters:
            exporter.close()
        if self.alerts is not None:
            self.alerts.close()


def truncate_records(run_dir: Path, step: int) -> None:
    """metrics.jsonl and ranks.jsonl without the steps after ``step``."""
    for name in FILES:
        truncate_jsonl(run_dir / name, step)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of ``path`` whose ``step`` is at most ``step``."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def read_records(path: Path) -> list[dict]:
    """The complete lines of a JSONL file (one still being written is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
