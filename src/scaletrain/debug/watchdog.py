"""Hang and desync diagnosis during training.

Each rank runs a daemon thread that publishes a heartbeat to the c10d store
every ``interval`` seconds: its step and phase (set by the training loop, a
plain attribute write), the sum of its process groups' collective sequence
numbers (c10d counts every collective a group issues), and when any of them
last changed. Every rank's thread also reads all heartbeats. When some rank
has made no progress for ``debug.hang_timeout`` seconds, or stopped
publishing (dead or frozen), the first rank to notice becomes the reporter:
it asks every reachable rank to dump its main thread's Python stack and
recent collectives into the store, waits briefly, writes
``hang_report.json`` and a readable summary on stderr naming the odd rank(s)
out, where each rank is stuck and the likely cause, and every rank exits
with code 3. A failing collective (a peer died: gloo and NCCL raise) goes
through the same diagnosis from the training thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter, deque
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from scaletrain.observe.events import append_event

EXIT_HANG = 3
_PREFIX = "scaletrain/watchdog/"


def collective_count() -> int:
    """Collectives this rank has issued, over all its process groups."""
    total = 0
    for pg in list(dist.distributed_c10d._world.pg_map):
        try:
            total += pg._get_sequence_number_for_group()
        except Exception:  # a backend without sequence numbers
            pass
    return total


def _frames(thread_id: int) -> list[dict]:
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return []
    return [{"file": f.filename, "line": f.lineno, "function": f.name, "code": f.line}
            for f in traceback.extract_stack(frame)]


def _where(frames: list[dict]) -> dict:
    """The innermost frame outside torch (the caller's line), and the
    collective the rank is inside, if any."""
    collective = None
    for f in reversed(frames):
        if "torch/distributed" in f["file"] and collective is None and f["function"] in _COLLECTIVES:
            collective = f["function"]
    outside = [f for f in frames if "site-packages" not in f["file"] and "/lib/python3" not in f["file"]]
    top = outside[-1] if outside else (frames[-1] if frames else None)
    return {"at": f"{top['file']}:{top['line']} in {top['function']}" if top else "unknown",
            "code": top["code"] if top else None, "in_collective": collective}


_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
                "reduce_scatter_single", "broadcast",
                "barrier", "monitored_barrier", "send", "recv", "all_gather_object", "broadcast_object_list",
                "gather_object", "all_to_all_single", "reduce", "gather", "scatter", "wait", "reduce_scatter"}


class Watchdog:
    def __init__(self, rank: int, world_size: int, run_dir: Path, timeout: float, interval: float | None = None):
        self.rank, self.world_size, self.run_dir, self.timeout = rank, world_size, run_dir, timeout
        self.interval = interval or max(0.2, min(5.0, timeout / 6))
        self.step, self.phase = 0, "start"
        self.store = dist.distributed_c10d._get_default_store()
        self.store.set_timeout(timedelta(seconds=max(5.0, 2 * self.interval)))
        self.main_thread = threading.main_thread().ident
        self.history: deque = deque(maxlen=16)  # (time, step, phase, collectives)
        self._state = None
        self._progress_at = self.started_at = time.time()
        self.dead: list[int] = []
        self.late: list[int] = []  # ranks without a recent heartbeat, as last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scaletrain-watchdog", daemon=True)

    # --- called by the training loop (cheap: attribute writes)
    def set(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase

    def start(self) -> "Watchdog":
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank finished: its silence from now on is not a hang."""
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)
        self.phase = "done"
        try:
            self._publish()
        except Exception:
            pass

    # --- the thread
    def _publish(self) -> None:
        now = time.time()
        state = (self.step, self.phase, collective_count())
        if state != self._state:
            self._state, self._progress_at = state, now
            self.history.append({"time": now, "step": state[0], "phase": state[1], "collectives": state[2]})
        beat = {"rank": self.rank, "step": state[0], "phase": state[1], "collectives": state[2],
                "progress_at": self._progress_at, "published_at": now, "pid": os.getpid(),
                "host": socket.gethostname()}
        self.store.set(f"{_PREFIX}hb/{self.rank}", json.dumps(beat))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
                self._exit_if_peer_failed()
                if self.store.check([f"{_PREFIX}dump_request"]):
                    self._dump_and_exit()
                hung = self._find_hang()
                if hung and self.store.add(f"{_PREFIX}reporter", 1) == 1:
                    self.report(hung)
            except Exception as exc:  # the store is gone: the job is ending
                if self._stop.is_set():
                    return
                print(f"watchdog: {exc}", file=sys.stderr)
                return

    # --- one rank's own error ends the job (scaletrain.train.failures)
    def announce_failure(self, line: str) -> None:
        """Tell the other ranks that this one failed, so they stop now."""
        try:
            if not self.store.check([f"{_PREFIX}failed"]):
                self.store.set(f"{_PREFIX}failed", json.dumps({"rank": self.rank, "line": line}))
        except Exception:  # the store is gone: the others find out from their collectives
            pass

    def peer_failure(self) -> dict | None:
        if not self.store.check([f"{_PREFIX}failed"]):
            return None
        failure = json.loads(self.store.get(f"{_PREFIX}failed"))
        return failure if failure["rank"] != self.rank else None

    def _exit_if_peer_failed(self) -> None:
        if (failure := self.peer_failure()) is not None:
            print(f"error: stopping rank {self.rank}: {failure['line']}", file=sys.stderr, flush=True)
            _exit(1)

    def missing_ranks(self) -> list[int]:
        """Ranks whose heartbeat was older than three intervals at the watchdog
        thread's last look (for the alerts: no store reads on the training thread)."""
        return list(self.late)

    def heartbeats(self) -> dict[int, dict]:
        beats = {}
        for r in range(self.world_size):
            key = f"{_PREFIX}hb/{r}"
            if self.store.check([key]):
                beats[r] = json.loads(self.store.get(key))
        return beats

    def _find_hang(self) -> str | None:
        now = time.time()
        beats = self.heartbeats()
        self.late = [r for r in range(self.world_size) if r not in beats or (
            beats[r]["phase"] != "done" and now - beats[r]["published_at"] > 3 * self.interval)]
        host = socket.gethostname()
        dead = [r for r, b in beats.items() if b["phase"] != "done" and b.get("host") == host
                and not _alive(b["pid"])]
        if dead:
            self.dead = dead
            return f"rank(s) {dead} died (process {', '.join(str(beats[r]['pid']) for r in dead)} is gone)"
        missing = [r for r in range(self.world_size)
                   if (r not in beats and now - self.started_at > self.timeout)
                   or (r in beats and beats[r]["phase"] != "done"
                       and now - beats[r]["published_at"] > max(self.timeout, 3 * self.interval))]
        if missing:
            return f"rank(s) {missing} stopped publishing heartbeats"
        stalled = [r for r, b in beats.items() if b["phase"] != "done" and now - b["progress_at"] > self.timeout]
        if stalled:
            return f"no progress for {self.timeout:g}s on rank(s) {stalled}"
        return None

    def _dump(self) -> None:
        frames = _frames(self.main_thread)
        dump = {"rank": self.rank, "pid": os.getpid(), "step": self.step, "phase": self.phase,
                "collectives": collective_count(), "stack": frames, **_where(frames),
                "recent": list(self.history)}
        self.store.set(f"{_PREFIX}dump/{self.rank}", json.dumps(dump))

    def _dump_and_exit(self) -> None:
        self._dump()
        deadline = time.time() + 4 * self.interval + 10
        while time.time() < deadline and not self.store.check([f"{_PREFIX}verdict"]):
            time.sleep(self.interval / 2)
        _exit(EXIT_HANG)

    def report(self, trigger: str, error: str | None = None) -> None:
        """Collect every reachable rank's dump, write the report, exit 3."""
        self._exit_if_peer_failed()  # a rank that died of its own error is not a hang
        self.store.set(f"{_PREFIX}dump_request", "1")
        self._dump()
        deadline = time.time() + 2 * self.interval + 0.5
        dumps: dict[int, dict] = {}
        while time.time() < deadline and len(dumps) < self.world_size:
            for r in range(self.world_size):
                key = f"{_PREFIX}dump/{r}"
                if r not in dumps and self.store.check([key]):
                    dumps[r] = json.loads(self.store.get(key))
            time.sleep(self.interval / 4)
        beats = self.heartbeats()
        report = diagnose(trigger, beats, dumps, self.world_size, time.time(), self.timeout, self.dead)
        if error:
            report["error_on_reporter"] = error
        report["reporter"] = self.rank
        path = self.run_dir / "hang_report.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)
        print(summary_text(report, path), file=sys.stderr, flush=True)
        self.store.set(f"{_PREFIX}verdict", "1")
        append_event(self.run_dir, "hang", report["ranks"][self.rank].get("step") or self.step, self.rank,
                     f"suspect rank(s) {report['suspect_ranks']}: {report['likely_cause']}")
        _hang_alert(self.run_dir, report)
        self._end_local_ranks(beats)
        _exit(EXIT_HANG)

    def _end_local_ranks(self, beats: dict[int, dict]) -> None:
        """The other ranks on this host exit by themselves once they see the
        verdict; one that is frozen (SIGSTOP, uninterruptible I/O) never
        would, and torchrun's agent would wait 30 s for it: SIGKILL it, so the
        whole job ends within hang_timeout + a few seconds."""
        host = socket.gethostname()
        local = [b["pid"] for r, b in beats.items() if r != self.rank and b.get("host") == host]
        deadline = time.time() + 2 * self.interval + 1
        while time.time() < deadline and any(_alive(pid) for pid in local):
            time.sleep(0.1)
        for pid in local:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def on_failure(self, exc: BaseException) -> None:
        """A collective raised on this rank (e.g. a peer died): a peer that
        announced its own error ends this rank (exit 1); a dead, missing or
        out-of-step peer is reported (exit 3); otherwise return. SIGTERM or
        SIGINT (torchrun stops the group when a peer dies) shortens the
        search to a grace of two heartbeat intervals (enough to name a dead
        peer and answer the reporter's dump request), never waits it out."""
        signalled = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: signalled.set())
        deadline = time.time() + max(self.timeout, 3 * self.interval) + self.interval
        grace_set = False
        trigger = None
        while time.time() < deadline and trigger is None:
            try:
                self._exit_if_peer_failed()
                if self.store.check([f"{_PREFIX}dump_request"]):
                    self._dump_and_exit()  # another rank is writing the report
                trigger = self._find_hang()
            except Exception:  # the store is gone (the agent ended the job): nothing to diagnose
                return
            if signalled.is_set() and not grace_set:
                deadline, grace_set = min(deadline, time.time() + 2 * self.interval + 1), True
            time.sleep(self.interval / 2)
        if trigger is None:
            return
        if self.store.add(f"{_PREFIX}reporter", 1) == 1:
            self.report(trigger, error=f"{type(exc).__name__}: {exc}")
        self._dump_and_exit()


def _hang_alert(run_dir: Path, report: dict) -> None:
    """The hang as a critical alert in alerts.jsonl, naming the suspect rank(s)."""
    from scaletrain.observe.sinks import AlertEvent, JsonlSink

    step = max((e.get("step") or 0 for e in report["ranks"]), default=0)
    sink = JsonlSink(run_dir / "alerts.jsonl")
    try:
        sink.send(AlertEvent(time.time(), step, "hang", "critical", "firing",
                             f"rank(s) {report['suspect_ranks']}: {report['likely_cause']}", report["suspect_ranks"]))
    except (OSError, ValueError):
        pass
    finally:
        sink.close()


def _alive(pid: int) -> bool:
    """Whether a local process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def diagnose(trigger: str, beats: dict[int, dict], dumps: dict[int, dict], world: int, now: float,
             timeout: float, dead: list[int] | None = None) -> dict:
    """Name the odd rank(s) out and the likely cause."""
    ranks = {}
    for r in range(world):
        b, d = beats.get(r), dumps.get(r)
        entry = {"rank": r, "heartbeat_age_s": round(now - b["published_at"], 1) if b else None,
                 "no_progress_s": round(now - b["progress_at"], 1) if b else None}
        if d:
            entry.update({k: d[k] for k in ("step", "phase", "collectives", "at", "code", "in_collective", "pid")})
            entry["stack"] = [f"{f['file']}:{f['line']} in {f['function']}" for f in d["stack"]][-12:]
            entry["recent"] = d["recent"]
        elif b:
            entry.update({k: b[k] for k in ("step", "phase", "collectives", "pid")})
        ranks[r] = entry
    missing = sorted(set(dead or []) | {r for r in range(world) if r not in dumps and (
        r not in beats or now - beats[r]["published_at"] > min(timeout, 10))})
    suspects, cause = [], ""
    if missing:
        suspects = missing
        cause = (f"rank(s) {missing} stopped publishing heartbeats and did not answer the dump request: the "
                 "process died (killed, OOM-killed: check dmesg and its log) or is frozen")
    else:
        present = [ranks[r] for r in range(world) if "step" in ranks[r]]
        places = Counter((e.get("in_collective"), e.get("at")) for e in present)
        common_place = places.most_common(1)[0][0] if places else None
        elsewhere = [e for e in present if e.get("in_collective") and (e.get("in_collective"), e.get("at"))
                     != common_place and common_place[0]]
        steps = Counter(e["step"] for e in present)
        common_step = steps.most_common(1)[0][0] if steps else None
        off_step = [e["rank"] for e in present if e["step"] != common_step]
        counts = Counter(e["collectives"] for e in present if e["step"] == common_step)
        common_count = counts.most_common(1)[0][0] if counts else None
        if elsewhere and len(elsewhere) < len(present) and places[common_place] > 1:
            suspects = [e["rank"] for e in elsewhere]
            cause = "; ".join(
                f"rank {e['rank']} waits in {e['in_collective']} at {e['at']} while the others wait in "
                f"{common_place[0]} at {common_place[1]}: the ranks called different collectives (a collective "
                "under a rank-dependent branch, e.g. `if rank == 0:`, or code paths that diverged)"
                for e in elsewhere)
        elif off_step and len(off_step) < len(present):
            suspects = off_step
            detail = ", ".join(f"rank {r} at step {ranks[r]['step']} ({ranks[r]['phase']})" for r in off_step)
            cause = (f"{detail} while the others are at step {common_step}: a rank ran a different number of "
                     "iterations (uneven data: one batch fewer or more; a rank that skipped a step)")
        else:
            odd = [e for e in present if e["collectives"] != common_count]
            phases = Counter(e["phase"] for e in present)
            common_phase = phases.most_common(1)[0][0]
            off_phase = [e["rank"] for e in present if e["phase"] != common_phase]
            outside = [e["rank"] for e in present if not e.get("in_collective")]
            top = max(e["collectives"] for e in present)
            low = min(e["collectives"] for e in present)
            # The furthest-behind rank(s), not waiting in a collective: the others
            # went ahead (collectives issued from C++, e.g. DDP's, count too) and wait.
            stuck = [e for e in present if e["collectives"] == low < top and not e.get("in_collective")]
            if stuck and len(stuck) < len(present):  # the others went ahead and now wait for them
                suspects = [e["rank"] for e in stuck]
                cause = "; ".join(
                    f"rank {e['rank']} is behind by {top - e['collectives']} collective(s) and not in a collective: "
                    f"stuck in its own code at {e.get('at')} (a long computation, sleep, I/O or lock on that rank)"
                    for e in stuck)
            elif odd and len(odd) < len(present):
                suspects = [e["rank"] for e in odd]
                parts = []
                for e in odd:
                    delta = e["collectives"] - common_count
                    if delta > 0:
                        parts.append(f"rank {e['rank']} issued {delta} more collective(s) than the others in step "
                                     f"{e['step']} (a collective under a rank-dependent branch, e.g. `if rank == "
                                     f"0:`), now at {e.get('at')}")
                    elif e.get("in_collective"):
                        parts.append(f"rank {e['rank']} issued {-delta} fewer collective(s) than the others in step "
                                     f"{e['step']} (a collective skipped on that rank: an exception caught and "
                                     f"`continue`d, an early return), now in {e['in_collective']} at {e.get('at')}")
                    else:
                        parts.append(f"rank {e['rank']} is behind the others by {-delta} collective(s) and not in "
                                     f"a collective: stuck in its own code at {e.get('at')} (a long computation, "
                                     "sleep, I/O or lock on that rank)")
                cause = "; ".join(parts)
            elif off_phase and len(off_phase) < len(present) and phases[common_phase] > 1:
                suspects = off_phase
                cause = "; ".join(
                    f"rank {r} is in phase {ranks[r]['phase']} ({ranks[r].get('at')}) while the others are in "
                    f"{common_phase} of the same step: the ranks' control flow diverged (a step skipped after a "
                    "caught exception, an early exit or break on one rank)" for r in off_phase)
            else:
                if outside and len(outside) < len(present):
                    suspects = outside
                    cause = "; ".join(f"rank {r} is outside any collective at {ranks[r].get('at')} while the others "
                                      "wait in one: it is slow or stuck there" for r in outside)
                else:
                    cause = ("every rank waits in the same collective and step: look for a rank-dependent branch or "
                             "mismatched tensor shapes (run with TORCH_DISTRIBUTED_DEBUG=DETAIL)")
    return {"trigger": trigger, "suspect_ranks": suspects, "likely_cause": cause, "world_size": world,
            "hang_timeout_s": timeout, "time": now, "ranks": [ranks[r] for r in range(world)]}


def summary_text(report: dict, path: Path) -> str:
    lines = [f"HANG DETECTED ({report['trigger']}); report: {path}",
             f"suspect rank(s): {report['suspect_ranks'] or 'none identified'}",
             f"likely cause: {report['likely_cause']}"]
    for e in report["ranks"]:
        where = e.get("in_collective") and f"in {e['in_collective']} " or ""
        lines.append(f"  rank {e['rank']}: step {e.get('step')} phase {e.get('phase')} collectives "
                     f"{e.get('collectives')} {where}at {e.get('at', 'no dump (unreachable)')}")
    lines.append("next: read the stacks in the report; rerun with TORCH_DISTRIBUTED_DEBUG=DETAIL to check "
                 "collective shapes; see README 'When a job hangs or crashes'")
    return "\n".join(lines)
