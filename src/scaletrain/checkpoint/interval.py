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
