"""``scaletrain bench comm`` and ``scaletrain doctor``: parse, launch, print."""

from __future__ import annotations

import json
from pathlib import Path

from scaletrain.errors import UserError
from scaletrain.parallel.runtime import max_local_processes, under_launcher

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}


def parse_bytes(text: str, option: str) -> int:
    t = text.strip().upper()
    digits = t.rstrip("KMGB")
    unit = t[len(digits):]
    if not digits.isdigit() or unit not in _UNITS:
        raise UserError(f"{option} {text!r}; allowed: a byte count such as 4, 64K, 16M or 1G")
    return int(digits) * _UNITS[unit]


def check_nproc(nproc: int, minimum: int = 1) -> None:
    most = max_local_processes()
    if nproc < minimum or nproc > most:
        raise UserError(f"--nproc = {nproc}; allowed: {minimum} to {most} on this machine")


def bench_comm(nproc: int, ops: str, min_bytes: str, max_bytes: str, iters: int, as_json: bool,
               out: Path | None) -> int:
    from scaletrain.debug.commbench import OPS, sizes_between

    selected = list(OPS) if ops == "all" else [o.strip() for o in ops.split(",")]
    unknown = [o for o in selected if o not in OPS]
    if unknown:
        raise UserError(f"--ops: unknown {', '.join(unknown)}; allowed: {', '.join(OPS)} or all")
    low, high = parse_bytes(min_bytes, "--min-bytes"), parse_bytes(max_bytes, "--max-bytes")
    if low > high:
        raise UserError(f"--min-bytes {min_bytes} is larger than --max-bytes {max_bytes}")
    if iters < 1:
        raise UserError(f"--iters = {iters}; allowed: 1 or more")
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UserError(f"--out {out}: {'is a directory' if out.is_dir() else f'the directory {out.parent} does not exist'}"
                        "; give a file path in an existing directory")
    if not under_launcher():
        check_nproc(nproc, minimum=2)
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        from scaletrain.parallel.runtime import run_local

        argv = ["bench", "comm", "--ops", ",".join(selected), "--min-bytes", str(low), "--max-bytes", str(high),
                "--iters", str(iters)] + (["--json"] if as_json else []) + (["--out", str(out)] if out else [])
        try:
            run_local(nproc, argv)
        except ChildFailedError as exc:
            print(f"error: bench comm failed on rank(s) {sorted(exc.failures)}")
            return 1
        return 0
    return _bench_worker(selected, sizes_between(low, high), iters, as_json, out)


def _bench_worker(ops: list[str], sizes: list[int], iters: int, as_json: bool, out: Path | None) -> int:
    import torch.distributed as dist

    from scaletrain.debug.commbench import run_bench
    from scaletrain.parallel.runtime import bind_training_thread, init_runtime, shutdown

    runtime = init_runtime(timeout_s=300)
    bind_training_thread(runtime)  # placed as the trainer places its workers
    try:
        results = run_bench(ops, sizes, iters, runtime.device)
        if runtime.is_main:
            backend = dist.get_backend()
            payload = {"backend": backend, "ranks": runtime.world_size, "results": results}
            if out:
                out.write_text(json.dumps(payload, indent=1))
            if as_json:
                print(json.dumps(payload, indent=1))
            else:
                _print_results(payload)
        wrong = [r for r in results if not r["correct"]]
        return 1 if wrong else 0
    finally:
        shutdown(runtime)


def _print_results(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{payload['backend']} collectives over {payload['ranks']} ranks "
                        "(time = slowest rank; busbw per nccl-tests)")
    for col in ("op", "size", "time us", "algbw GB/s", "busbw GB/s", "check"):
        table.add_column(col, justify="right")
    for r in payload["results"]:
        table.add_row(r["op"], _human(r["bytes"]), f"{r['time_us']:.1f}", f"{r['algbw_gbps']:.3f}",
                      f"{r['busbw_gbps']:.3f}", "ok" if r["correct"] else "WRONG RESULT")
    Console(width=120).print(table)


def _human(n: int) -> str:
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def doctor(nproc: int, checks: str | None, as_json: bool, directory: Path, master: str | None) -> int:
    from scaletrain.debug.doctor import CHECKS

    names = list(CHECKS) if not checks else [c.strip() for c in checks.split(",")]
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise UserError(f"--check: unknown check {', '.join(unknown)}; allowed: {', '.join(CHECKS)}")
    if master:
        from scaletrain.debug.doctor import reachable

        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--master {master!r}; allowed: HOST:PORT")
        if not reachable(host, int(port)):
            raise UserError(f"--master {master}: cannot reach {host}:{port} within 3 s (is rank 0's rendezvous "
                            "up? firewall? MASTER_ADDR/MASTER_PORT)")
    if not under_launcher() and nproc > 1:
        check_nproc(nproc)
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        from scaletrain.parallel.runtime import run_local

        argv = ["doctor", "--check", ",".join(names), "--dir", str(directory)] + (["--json"] if as_json else [])
        try:
            run_local(nproc, argv)
        except ChildFailedError:  # a FAIL on some rank (its report is printed) or a crash
            return 1
        return 0
    check_nproc(nproc)
    return _doctor_worker(names, as_json, directory, master)


def _doctor_worker(names: list[str], as_json: bool, directory: Path, master: str | None) -> int:
    import torch.distributed as dist

    from scaletrain.debug.doctor import merge_ranks, run_checks, single_process_group
    from scaletrain.parallel.runtime import init_runtime, shutdown

    runtime = init_runtime(timeout_s=60)
    alone = not runtime.distributed
    if alone and "all_reduce" in names:
        single_process_group()
    try:
        mine = run_checks(names, directory, master, runtime.device)
        if runtime.distributed:
            gathered = [None] * runtime.world_size
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        results = merge_ranks(gathered)
        failed = any(r["status"] == "FAIL" for r in results)
        if runtime.is_main:
            if as_json:
                print(json.dumps({"world_size": runtime.world_size, "checks": results}, indent=1))
            else:
                colors = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}
                from rich.console import Console

                console = Console(width=160)
                console.print(f"scaletrain doctor: {runtime.world_size} rank(s)")
                for r in results:
                    fix = f"\n        fix: {r['fix']}" if r["fix"] and r["status"] != "PASS" else ""
                    console.print(f"[{colors[r['status']]}]{r['status']:4}[/] {r['name']:<11} {r['detail']}{fix}")
        return 1 if failed else 0
    finally:
        if alone and dist.is_initialized():
            dist.destroy_process_group()
        shutdown(runtime)
