"""Follow a training run: when a newer valid checkpoint appears in the run's
checkpoint directory, roll the replicas to it one at a time (drain, reload,
health check, rejoin), so that the endpoint stays up and never serves a
half-written checkpoint.

Valid means what resuming a run means (checkpoint/manifest.py): its
``manifest.json`` exists and every file matches its size and SHA-256. A
checkpoint that fails the check is passed over until its manifest changes.
A replica that does not come up on the new checkpoint is put back on the
old one and the roll stops; the next newer checkpoint is tried when it
appears."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from scaletrain.checkpoint.manifest import MANIFEST, step_dirs, verify


def checkpoint_root_of(run_dir: Path) -> Path:
    from scaletrain.checkpoint.paths import checkpoint_root
    from scaletrain.config import load_config

    return checkpoint_root(load_config(run_dir / "config.toml"), run_dir)


class Follower:
    def __init__(self, root: Path, current: Path):
        self.root, self.current = root, current
        self.rejected: dict[Path, float] = {}  # checkpoint -> its manifest's mtime when it failed

    def step(self, path: Path) -> int:
        return next((s for s, p in step_dirs(self.root) if p == path), -1) if path else -1

    def newer_valid(self) -> Path | None:
        """The newest checkpoint past the current one that verifies (checked newest first)."""
        current_step = self.step(self.current)
        for step, path in reversed(step_dirs(self.root)):
            if step <= current_step:
                return None
            manifest = path / MANIFEST
            mtime = manifest.stat().st_mtime if manifest.exists() else 0.0
            if self.rejected.get(path) == mtime:
                continue
            problem = verify(path)
            if problem is None:
                return path
            self.rejected[path] = mtime
            print(f"follow: not serving {path.name} yet: {problem}", file=sys.stderr, flush=True)
        return None


async def run_follower(follower: Follower, fleet, poll_s: float = 2.0) -> None:
    """``fleet``: .active() replicas, .model, .supervisor, .lock, .drain_s, .grace_s, .metrics."""
    while True:
        await asyncio.sleep(poll_s)
        new = await asyncio.to_thread(follower.newer_valid)  # hashing a large checkpoint takes a while
        if new is None:
            continue
        old = follower.current
        print(f"follow: rolling {len(fleet.active())} replica(s) from {old.name} to {new.name}", file=sys.stderr,
              flush=True)
        async with fleet.lock:  # no scaling while replicas roll
            rolled = await roll(fleet, str(old), str(new))
        if rolled:
            follower.current, fleet.model = new, str(new)  # replicas the autoscaler adds start on it too
            fleet.metrics.rolls.labels("done").inc()
            print(f"follow: serving {new.name}", file=sys.stderr, flush=True)
        else:
            follower.rejected[new] = (new / MANIFEST).stat().st_mtime if (new / MANIFEST).exists() else 0.0
            fleet.metrics.rolls.labels("rolled_back").inc()


async def roll(fleet, old: str, new: str) -> bool:
    sup = fleet.supervisor
    if len(fleet.active()) == 1:  # the only replica: start its successor first, so the endpoint stays up
        replica = fleet.active()[0]
        successor = sup.start(new, replica.threads, step_delay_s=replica.step_delay_s)
        if not await sup.wait_ready(successor):
            print(f"follow: a replica did not come up on {Path(new).name}:\n{sup.log_tail(successor, 800)}",
                  file=sys.stderr, flush=True)
            await sup.retire(successor, 0, fleet.grace_s)
            return False
        await sup.retire(replica, fleet.drain_s, fleet.grace_s)
        return True
    for replica in list(fleet.active()):
        if await sup.reload(replica, new, fleet.drain_s, fleet.grace_s):
            continue
        print(f"follow: replica on port {replica.port} did not come up on {Path(new).name}:\n"
              f"{sup.log_tail(replica, 800)}\nfollow: putting it back on {Path(old).name}", file=sys.stderr,
              flush=True)
        rolled = [r for r in fleet.active() if r.model == new]
        for back in [replica, *rolled]:
            await sup.reload(back, old, fleet.drain_s, fleet.grace_s)
        return False
    return True
