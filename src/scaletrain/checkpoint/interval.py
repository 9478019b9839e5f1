"""``checkpoint.interval = auto``: how often to save, from what saving costs
and how often this run fails.

Young (1974) and Daly (2006): with save cost C and mean time between
failures M, the interval sqrt(2·C·M) minimizes the expected time lost to
saving plus the expected work lost to a failure (first order, valid for
C << M). C is measured on the run's own saves (what training waits for:
with async saves only the copy to CPU memory); M comes from the run's
history in events.jsonl (restarts, hangs, out-of-memory recoveries), or
``checkpoint.mtbf_hours`` while that history holds no failure.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

FIRST_SAVE_STEP = 10  # the first save, which measures C
FAILURE_KINDS = ("restart", "hang", "oom_recovery")


def young_daly_seconds(save_cost_s: float, mtbf_s: float) -> float:
    return math.sqrt(2 * save_cost_s * mtbf_s)


def mtbf_seconds(events: list[dict], started: float, now: float, assumed_s: float) -> tuple[float, str]:
    """(M, where it comes from)."""
    failures = [e for e in events if e.get("kind") in FAILURE_KINDS]
    if not failures:
        return assumed_s, "assumed: no failure in this run's history"
    span = now - min([started] + [e["time"] for e in events])
    return span / len(failures), f"observed: {len(failures)} failure(s) in {span / 3600:.2f} h"


def interval_steps(save_cost_s: float, mtbf_s: float, step_time_s: float) -> int:
    """The Young/Daly interval in whole steps (at least 1)."""
    return max(1, round(young_daly_seconds(save_cost_s, mtbf_s) / max(step_time_s, 1e-9)))


class CheckpointSchedule:
    """When to save: every ``checkpoint.interval`` steps, or under 'auto'
    first at FIRST_SAVE_STEP and then at the Young/Daly interval, revised
    after each save (logged when it changes by more than 25%)."""

    def __init__(self, cfg, run_dir: Path, is_main: bool, step: int):
        from scaletrain.config import AUTO

        self.interval, self.auto = cfg.interval, cfg.interval == AUTO
        self.mtbf_assumed_s = cfg.mtbf_hours * 3600
        self.run_dir, self.is_main = run_dir, is_main
        self.started_at, self.last_save_step = time.time(), step
        self.auto_interval: int | None = None
        self.save_costs: list[float] = []

    def due(self, step: int, last_step: int) -> bool:
        if self.interval == 0 or step >= last_step:
            return False
        if not self.auto:
            return step % self.interval == 0
        return step - self.last_save_step >= (self.auto_interval or FIRST_SAVE_STEP)

    def timed_save(self, checkpoints, step: int, records: list[dict]) -> None:
        started = time.perf_counter()
        checkpoints.save(step)
        self.last_save_step = step
        if self.auto:
            self.save_costs.append(time.perf_counter() - started)
            self._revise(records)

    def _revise(self, records: list[dict]) -> None:
        from scaletrain.observe.events import read_events

        cost = statistics.median(self.save_costs[-5:])  # one slow save should not swing the interval
        mtbf, source = mtbf_seconds(read_events(self.run_dir), self.started_at, time.time(), self.mtbf_assumed_s)
        recent = records[-20:]
        step_time = sum(r["step_time_s"] for r in recent) / len(recent)
        interval = interval_steps(cost, mtbf, step_time)
        previous = self.auto_interval
        if previous is not None and 0.8 <= interval / previous <= 1.25:
            return
        self.auto_interval = interval
        if self.is_main:
            print(f"checkpoint.interval = auto: save {cost:.3g} s, MTBF {mtbf / 3600:.3g} h ({source}), step "
                  f"{step_time:.3g} s -> every {interval} steps (Young/Daly sqrt(2 C M) = "
                  f"{young_daly_seconds(cost, mtbf):.3g} s)", file=sys.stderr, flush=True)
