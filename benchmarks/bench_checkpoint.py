"""Checkpoint speed, as ratios measured in one run on the same disk:

- save and load throughput of a real checkpoint (DCP shards + manifest with
  checksums + fsync + rename) against a plain sequential write / read of the
  same number of bytes (one file, written and fsynced, then read back);
- the time an async save blocks training against a synchronous save.

    python benchmarks/bench_checkpoint.py [--model small] [--dir /path/on/the/disk]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from scaletrain.checkpoint.manifest import step_dirs
from scaletrain.config import load_config
from scaletrain.parallel.runtime import Runtime
from scaletrain.train.trainer import Trainer


def plain_write_read(path: Path, n_bytes: int) -> tuple[float, float]:
    payload = os.urandom(min(n_bytes, 1 << 26))
    start = time.perf_counter()
    with path.open("wb") as fh:
        left = n_bytes
        while left > 0:
            fh.write(payload[:left])
            left -= len(payload)
        fh.flush()
        os.fsync(fh.fileno())
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    with path.open("rb") as fh:
        while fh.read(1 << 24):
            pass
    return write_s, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        cfg = load_config(None, [f"model.name={args.model}", "training.steps=1", "logging.sample_tokens=0",
                                 "checkpoint.keep_last=0", "checkpoint.resume=none"])
        trainer = Trainer(cfg, root, Runtime(0, 1, 0, __import__("torch").device("cpu")), show_progress=False)
        trainer.train_step()  # optimizer states exist
        ckpt = trainer.checkpoints
        saves, loads, plain_w, plain_r, blocking_sync, blocking_async = [], [], [], [], [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            ckpt.save(10 + i, blocking=True)
            saves.append(time.perf_counter() - start)
            blocking_sync.append(saves[-1])
            path = step_dirs(ckpt.root)[-1][1]
            n_bytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            start = time.perf_counter()
            ckpt.load(path)
            loads.append(time.perf_counter() - start)
            w, r = plain_write_read(root / "plain.bin", n_bytes)
            plain_w.append(w)
            plain_r.append(r)
            (root / "plain.bin").unlink()
        ckpt.cfg.async_save = True
        for i in range(args.repeats):
            start = time.perf_counter()
            ckpt.save(100 + i)  # returns once the state is staged in CPU memory
            blocking_async.append(time.perf_counter() - start)
            ckpt.wait()
        mb = n_bytes / 2**20
        save_s, load_s = statistics.median(saves), statistics.median(loads)
        w_s, r_s = statistics.median(plain_w), statistics.median(plain_r)
        print(f"model {args.model}: checkpoint of {mb:.1f} MiB (model + AdamW states), {args.repeats} repeats, "
              f"median; disk: {root}")
        print(f"{'':<34}{'MiB/s':>10}{'plain MiB/s':>13}{'ratio':>8}")
        print(f"{'save (DCP + checksums + fsync)':<34}{mb / save_s:>10.1f}{mb / w_s:>13.1f}{w_s / save_s:>8.3f}")
        print(f"{'load (DCP, resharding planner)':<34}{mb / load_s:>10.1f}{mb / r_s:>13.1f}{r_s / load_s:>8.3f}")
        sync_s, async_s = statistics.median(blocking_sync), statistics.median(blocking_async)
        print(f"training blocked per save: sync {sync_s * 1000:.1f} ms, async {async_s * 1000:.1f} ms, "
              f"async/sync = {async_s / sync_s:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
