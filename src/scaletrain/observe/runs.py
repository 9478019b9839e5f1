"""``scaletrain runs show RUN_DIR``: a run's summary, where its time went
(per rank, from ranks.jsonl), its failure history (events.jsonl) and its
alerts (alerts.jsonl), read from the run directory alone."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scaletrain.errors import UserError
from scaletrain.observe.breakdown import PHASES
from scaletrain.observe.events import read_events
from scaletrain.observe.recorder import read_records

SUMMARY_KEYS = ("model", "params", "layout", "world_size", "device", "steps", "tokens", "loss_first", "loss_last",
                "tokens_per_s", "mfu", "mem_peak_bytes", "stopped_early", "resumed_from", "skipped_steps",
                "nonfinite_steps", "skipped_checkpoints")


def breakdown_by_rank(rows: list[dict]) -> dict[int, dict[str, float]]:
    """The mean of each phase (and the step) per rank over the logged steps."""
    sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[int, int] = defaultdict(int)
    for row in rows:
        counts[row["rank"]] += 1
        for key in ("step_time_s", *PHASES, "other_s"):
            sums[row["rank"]][key] += row.get(key) or 0.0
    return {rank: {k: v / counts[rank] for k, v in sums[rank].items()} for rank in sorted(sums)}


def show_run(run_dir: Path, console: Console | None = None) -> None:
    if not run_dir.is_dir() or not ((run_dir / "config.toml").exists() or (run_dir / "metrics.jsonl").exists()):
        raise UserError(f"{run_dir} is not a scaletrain run directory (no config.toml or metrics.jsonl)")
    console = console or Console()
    summary_path = run_dir / "summary.json"
    metrics = read_records(run_dir / "metrics.jsonl")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        console.print(f"[bold]{run_dir}[/bold]: finished")
        for key in SUMMARY_KEYS:
            if key in summary:
                console.print(f"  {key}: {summary[key]}")
    else:
        last = metrics[-1] if metrics else {}
        console.print(f"[bold]{run_dir}[/bold]: no summary yet (running or stopped); last logged step "
                      f"{last.get('step')} loss {last.get('loss')}")
    _breakdown_table(console, breakdown_by_rank(read_records(run_dir / "ranks.jsonl")))
    _rows_table(console, "events", read_events(run_dir), ("step", "kind", "rank", "detail"))
    _rows_table(console, "alerts", read_records(run_dir / "alerts.jsonl"),
                ("step", "state", "severity", "name", "message"))
    if (run_dir / "hang_report.json").exists():
        report = json.loads((run_dir / "hang_report.json").read_text())
        console.print(f"hang report: suspect rank(s) {report['suspect_ranks']}: {report['likely_cause']}")


def _breakdown_table(console: Console, by_rank: dict[int, dict[str, float]]) -> None:
    if not by_rank:
        console.print("time breakdown: none recorded (ranks.jsonl is missing)")
        return
    table = Table(title="mean time per step (ms) by rank")
    keys = ("step_time_s", *PHASES, "other_s")
    for key in ("rank", *keys):
        table.add_column(key.removesuffix("_s"), justify="right")
    for rank, values in by_rank.items():
        table.add_row(str(rank), *(f"{values[k] * 1e3:.1f}" for k in keys))
    console.print(table)


def _rows_table(console: Console, title: str, rows: list[dict], keys: tuple[str, ...]) -> None:
    if not rows:
        console.print(f"{title}: none")
        return
    table = Table(title=title)
    for key in keys:
        table.add_column(key)
    for row in rows:
        table.add_row(*(str(row.get(k, "")) for k in keys))
    console.print(table)
