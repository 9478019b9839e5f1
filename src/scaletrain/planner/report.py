"""What ``plan --references`` and ``plan --min-gpus`` print."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from scaletrain.planner import references
from scaletrain.planner.hardware import GIB, load_catalog
from scaletrain.planner.scaling import min_gpus, prefer_simpler, scaling_table
from scaletrain.planner.search import search, train_overrides


def print_references(as_json: bool) -> int:
    """Published runs vs the planner, held-out errors, and the fit check."""
    catalog = load_catalog()
    rows = references.report(catalog)
    _, zero = references.load_references()
    zrows = references.zero_rows(zero)
    fit = references.fitted(catalog)
    held = [r for r in rows if r["held_out"]]
    summary = {"held_out_max_throughput_error": max(abs(r["throughput_error"]) for r in held),
               "held_out_mean_throughput_error": sum(abs(r["throughput_error"]) for r in held) / len(held),
               "max_memory_error": max(abs(r["memory_error"]) for r in rows if r["memory_error"] is not None),
               "fitted": fit,
               "catalog": {g: {k: getattr(catalog[g], k) for k in fit[g]} for g in fit}}
    if as_json:
        print(json.dumps({"runs": rows, "zero_model_states": zrows, "summary": summary}, indent=1))
        return 0
    console = Console(width=200)
    table = Table(title="published runs (references.toml) vs scaletrain plan; 'fit' rows set the device's "
                        "matmul_efficiency, 'held out' rows test it")
    for col in ("run", "set", "gpu", "gpus", "layout", "mb", "AC", "seq", "published tok/s/GPU", "predicted",
                "error", "published GiB (max reserved)", "predicted GiB", "error "):
        table.add_column(col, justify="left" if col in ("run", "set", "gpu", "layout", "AC") else "right")
    for r in rows:
        mem = r["published_memory_gib"]
        table.add_row(r["id"], "held out" if r["held_out"] else "fit", r["gpu"], str(r["gpus"]), r["layout"],
                      str(r["micro_batch"]), r["ac"], str(r["seq_len"]), f"{r['published_tokens_per_s_per_gpu']:,.0f}",
                      f"{r['predicted_tokens_per_s_per_gpu']:,.0f}", f"{r['throughput_error']:+.1%}",
                      f"{mem:.1f}" if mem else "-", f"{r['predicted_memory_gib']:.1f}",
                      f"{r['memory_error']:+.1%}" if mem else "-")
    console.print(table)
    zt = Table(title="ZeRO paper fig. 1 (Psi = 7.5B, N = 64, K = 12): model states per GPU, GB")
    for col in ("stage", "published", "planner's bytes per parameter", "error"):
        zt.add_column(col, justify="right")
    for z in zrows:
        zt.add_row(str(z["stage"]), f"{z['published_gb']:.1f}", f"{z['predicted_gb']:.2f}", f"{z['error']:+.1%}")
    console.print(zt)
    console.print(f"held-out throughput error: max {summary['held_out_max_throughput_error']:.1%}, mean "
                  f"{summary['held_out_mean_throughput_error']:.1%}; memory error max {summary['max_memory_error']:.1%}; "
                  f"fitted on the 'fit' rows: {fit} (catalog: {summary['catalog']})")
    for r in rows:
        console.print(f"  {r['id']}: {r['source']}", highlight=False)
    return 0


def print_scaling(w, cluster_for, counts: list[int], error: float, as_json: bool, micro_batch=None) -> int:
    rows = scaling_table(w, cluster_for, counts)
    first = min_gpus(rows)
    if as_json:
        print(json.dumps({"min_gpus": first and first.gpus, "rows": [
            {"gpus": r.gpus, "fits": r.best is not None, "tokens_per_s": r.best and r.best.tokens_per_s,
             "layout": r.best and r.best.as_dict()["layout"], "speedup": r.speedup, "efficiency": r.efficiency,
             "serial_fraction": r.serial_fraction} for r in rows]}, indent=1, default=str))
        return 0 if first else 2
    console = Console(width=200)
    table = Table(title=f"strong scaling of {w.model.name}, global batch {w.global_batch} x {w.seq_len} tokens: the "
                        "fastest fitting layout per GPU count")
    for col in ("GPUs", "best layout", "mb", "AC", "GiB", "step s", "tokens/s", "speedup", "efficiency",
                "serial fraction (Karp-Flatt)"):
        table.add_column(col, justify="left" if col in ("best layout", "AC") else "right")
    for r in rows:
        if r.best is None:
            table.add_row(str(r.gpus), "does not fit", *["-"] * 8)
            continue
        b = r.best
        table.add_row(str(r.gpus), b.layout.describe() + (" +offload" if b.layout.cpu_offload else ""),
                      str(b.layout.micro_batch), b.layout.activation_checkpointing, f"{b.total_bytes / GIB:.1f}",
                      f"{b.step_time_s:.2f}", f"{b.tokens_per_s:,.0f}", f"{r.speedup:.2f}", f"{r.efficiency:.0%}",
                      "-" if r.serial_fraction is None else f"{r.serial_fraction:.3f}")
    console.print(table)
    if first is None:
        console.print(f"no GPU count up to {counts[-1]} fits this job")
        return 2
    choice = prefer_simpler(search(w, cluster_for(first.gpus), micro_batch=micro_batch), error)
    lay = choice.preferred.layout
    console.print(f"minimum: {first.gpus} GPUs, with {lay.describe()}{' +offload' if lay.cpu_offload else ''}, "
                  f"micro-batch {lay.micro_batch}, AC {lay.activation_checkpointing}: {choice.reason}")
    console.print(f"run it on {first.gpus} GPUs with: scaletrain train "
                  + " ".join(f"--set {o}" for o in train_overrides(w, lay)), highlight=False)
    return 0
