"""What ``scaletrain plan`` prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scaletrain.errors import UserError
from scaletrain.parallel.rules import DTYPE_BYTES
from scaletrain.planner.estimate import Estimate
from scaletrain.planner.layout import Workload
from scaletrain.planner.hardware import GIB, find_device, load_catalog, parse_cluster
from scaletrain.planner import report
from scaletrain.planner.estimate import explain as explain_lines
from scaletrain.planner.references import held_out_error
from scaletrain.planner.scaling import gpu_counts, prefer_simpler
from scaletrain.planner.search import nearest_miss, resolve_model, search, train_overrides


def run_plan(model_spec, gpus, gpu, gpus_per_node, seq_len, global_batch, dtype, config, top, as_json,
             hardware, micro_batch=None, explain=None, min_gpus=False, max_gpus=1024) -> int:
    if top < 1:
        raise UserError(f"--top = {top}; allowed: 1 or more")
    if dtype is not None and dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    for flag, value in (("--seq-len", seq_len), ("--global-batch", global_batch), ("--gpus", gpus),
                        ("--gpus-per-node", gpus_per_node), ("--micro-batch", micro_batch), ("--explain", explain),
                        ("--max-gpus", max_gpus)):
        if value is not None and value < 1:  # 0 must not silently mean "the default"
            raise UserError(f"{flag} = {value}; allowed: 1 or more")
    if model_spec is None and config is None:
        raise UserError("give --model (a preset, a .toml config or a HF config.json) or --config")
    model, extra = resolve_model(model_spec or config)
    if config and model_spec:
        _, extra = resolve_model(config)
    catalog = load_catalog(hardware)
    cluster = parse_cluster(catalog, gpu, gpus, gpus_per_node)
    dtype = dtype or extra.get("dtype") or ("bf16" if cluster.device.bf16 else "fp16")
    if dtype == "bf16" and not cluster.device.bf16:
        dtype = "fp16"
    w = Workload(model, seq_len or extra.get("seq_len") or 4096, global_batch or extra.get("global_batch") or 1024,
                 dtype)
    if w.seq_len > model.max_seq_len:
        raise UserError(f"--seq-len {w.seq_len} exceeds the model's context ({model.max_seq_len} positions: "
                        "model.max_seq_len); the trainer would refuse it")
    if micro_batch is not None and w.global_batch % micro_batch:
        raise UserError(f"--micro-batch {micro_batch} does not divide --global-batch {w.global_batch} (the "
                        "trainer needs global = micro x data-parallel ranks x accumulation)")
    if min_gpus:
        if cluster.mixed:
            raise UserError("--min-gpus plans one kind of GPU; give --gpu NAME, not a mixed cluster")
        return report.print_scaling(w, lambda n: parse_cluster(catalog, gpu, n, gpus_per_node),
                                    gpu_counts(gpus_per_node, max_gpus), held_out_error(), as_json, micro_batch)
    estimates = search(w, cluster, micro_batch=micro_batch)
    fitting = [e for e in estimates if e.fits]
    choice = prefer_simpler(estimates, held_out_error())
    if explain is not None:
        if explain > len(estimates):
            raise UserError(f"--explain {explain}: only {len(estimates)} layouts were evaluated")
        print("\n".join(explain_lines(w, estimates[explain - 1], cluster)))
        return 0
    if as_json:
        print(json.dumps({"model": model.__dict__, "cluster": {"gpus": cluster.gpus, "gpus_per_node":
                          cluster.gpus_per_node, "device": cluster.device.__dict__, "notes": cluster.notes()},
                          "workload": {"seq_len": w.seq_len, "global_batch": w.global_batch, "dtype": w.dtype},
                          "layouts": [e.as_dict() for e in estimates[:top]],
                          "preferred": choice and {"layout": choice.preferred.as_dict(), "reason": choice.reason,
                                                   "train_overrides": train_overrides(w, choice.preferred.layout)},
                          "fitting": len(fitting), "evaluated": len(estimates)}, indent=1, default=str))
    else:
        _print_table(estimates[:top], w, cluster, len(fitting), len(estimates), choice)
    if not fitting:
        raise UserError(nearest_miss(estimates, cluster))
    return 0


def _print_table(estimates: list[Estimate], w: Workload, cluster, n_fit: int, n_all: int, choice) -> None:
    console = Console(width=200)
    from scaletrain.model import param_count

    console.print(f"[bold]{w.model.name}[/] ({param_count(w.model) / 1e9:.2f}B parameters), seq {w.seq_len}, "
                  f"global batch {w.global_batch}, {w.dtype} on {cluster.gpus} x {cluster.device.description} "
                  f"({cluster.gpus_per_node} per node): {n_fit} of {n_all} layouts fit")
    for note in cluster.notes():
        console.print(f"[yellow]note:[/] {note}")
    table = Table(show_lines=False)
    for col in ("#", "layout", "mb", "AC", "params", "grads", "held", "optim", "activ", "buffers", "other", "total GiB",
                "intra GB", "inter GB", "bubble", "step s", "tokens/s", "MFU", "fits"):
        table.add_column(col, justify="left" if col in ("layout", "fits") else "right")
    for i, e in enumerate(estimates, 1):
        mem = e.memory
        by_link = {"intra": 0.0, "inter": 0.0}
        for c in e.comm:
            by_link["intra" if c["link"].startswith("intra") else "inter"] += c["bytes"] / 1e9
        layout = e.layout.describe() + (" +offload" if e.layout.cpu_offload else "")
        table.add_row(str(i), layout, str(e.layout.micro_batch), e.layout.activation_checkpointing,
                      *(f"{mem[k] / GIB:.1f}" for k in ("parameters", "gradients", "held_full_grads", "optimizer",
                                                        "activations",
                                                        "comm_buffers", "overhead")),
                      f"{e.total_bytes / GIB:.1f}", f"{by_link['intra']:.1f}", f"{by_link['inter']:.1f}",
                      f"{e.bubble:.1%}", f"{e.step_time_s:.2f}", f"{e.tokens_per_s:,.0f}", f"{e.mfu:.1%}",
                      "yes" if e.fits else f"no: {e.why}")
    console.print(table)
    if choice is not None:
        best = choice.preferred
        console.print(f"preferred: {best.layout.describe()}{' +offload' if best.layout.cpu_offload else ''}, "
                      f"micro-batch {best.layout.micro_batch}, AC {best.layout.activation_checkpointing} "
                      f"({best.tokens_per_s:,.0f} tokens/s): {choice.reason}")
        console.print("run it with: scaletrain train " + " ".join(f"--set {o}" for o in train_overrides(w, best.layout)))
        comm = Table(title="communication per step of the best layout (one rank)")
        for col in ("collective", "group", "ranks", "calls", "GB", "link", "time s"):
            comm.add_column(col)
        for c in best.comm:
            comm.add_row(c["kind"], c["group"], str(c["ranks"]), str(c["calls"]), f"{c['bytes'] / 1e9:.3f}", c["link"],
                         f"{c['time_s']:.4f}")
        console.print(comm)
    console.print("memory = per-GPU peak (params/grads/optimizer states, FSDP's held full gradient, activations of "
                  "the microbatches in flight, FSDP unsharded buffers, CUDA/NCCL overhead); communication overlaps "
                  "compute where the engine overlaps it (FSDP prefetch, DDP buckets), TP and PP exposed; "
                  "--explain N shows one layout's arithmetic")


def run_calibrate(name: str, nproc: int, hardware: Path | None) -> int:
    from scaletrain.planner.calibrate import calibrate, write_entry

    if nproc < 2:
        raise UserError(f"--nproc = {nproc}; calibration measures collectives and needs 2 or more")
    device = calibrate(name, nproc, progress=lambda msg: print(msg, file=sys.stderr))
    path = write_entry(device, hardware)
    print(f"wrote [{name}] to {path}: {device.fp32:.3f} TFLOP/s fp32 matmul, {device.hbm_gbps:.1f} GB/s memory, "
          f"{device.elementwise_gbps:.1f} GB/s through a block's elementwise ops, "
          f"TP beyond compute and collectives {_dispatch(device.tp_dispatch_curve)} (TP), "
          f"{_dispatch(device.sp_dispatch_curve)} (TP + SP), {device.intra_gbps:.2f} GB/s all-reduce bus bandwidth, "
          f"{device.intra_latency_us:.0f} us latency")
    return 0


def _pair(predicted, measured) -> str:
    if predicted is None or not measured:
        return "-"
    return f"{predicted / 2**20:.2f} / {measured / 2**20:.2f} ({predicted / measured - 1:+.1%})"


def _dispatch(curve: tuple) -> str:
    return " / ".join(f"{b * 1e3:.1f} ms per block + {m * 1e3:.1f} ms per pass at {x / 1e3:.0f}k elements"
                      for x, b, m in curve)


def run_verify(name: str, hardware: Path | None, layouts: str | None, as_json: bool, nodes: int = 1,
               link_rate: str = "200mbit") -> int:
    from scaletrain.planner.verify import LAYOUTS, NODE_LAYOUTS, verify

    if nodes not in (1, 2):
        raise UserError(f"--nodes = {nodes}; allowed: 1 (this machine) or 2 (two network-namespace nodes)")
    known = NODE_LAYOUTS if nodes > 1 else LAYOUTS  # layouts that span nodes, or this machine's

    catalog = load_catalog(hardware)
    if name not in catalog:
        raise UserError(f"no hardware entry [{name}]: run scaletrain plan --calibrate first (it writes one)")
    device = find_device(catalog, name)
    names = None
    if layouts:
        names = [n.strip() for n in layouts.split(",")]
        unknown = [n for n in names if n not in dict(known)]
        if unknown:
            raise UserError(f"--layouts: unknown {unknown}; allowed: {', '.join(n for n, _ in known)}")
    try:
        result = verify(device, names, progress=lambda msg: print(msg, file=sys.stderr), nodes=nodes,
                        link_rate=link_rate)
    except RuntimeError as exc:  # a measured run failed: its own output says why
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result, indent=1))
        return 0
    console = Console(width=200)
    table = Table(title="per rank: predicted / measured")
    for col in ("layout", "rank", "params B", "grads B", "optim B", "states", "peak MiB pred", "peak MiB meas",
                "peak err", "saved activ. MiB pred / meas", "held grads MiB", "collective bytes"):
        table.add_column(col, justify="right")
    worst = 0.0
    for r in result["ranks"]:
        sp, sm = r["states_predicted"], r["states_measured"]
        err = r["peak_predicted"] / r["peak_measured"] - 1
        worst = max(worst, abs(err))
        same = r["collectives_predicted"] == r["collectives_measured"]
        coll = ", ".join(f"{k} {v['bytes']}" for k, v in r["collectives_measured"].items())
        table.add_row(r["layout"], str(r["rank"]), str(sp["params_bytes"]), str(sp["grads_bytes"]),
                      str(sp["optimizer_bytes"]), "exact" if sp == sm else f"MISMATCH {sm}",
                      f"{r['peak_predicted'] / 2**20:.2f}", f"{r['peak_measured'] / 2**20:.2f}", f"{err:+.1%}",
                      _pair(r["activations_predicted"], r["activations_measured"]),
                      f"{r['held_grads_predicted'] / 2**20:.2f}",
                      ("exact: " if same else f"MISMATCH predicted {r['collectives_predicted']}: ") + coll)
    console.print(table)
    if result.get("hooks"):
        hooks = Table(title=f"DDP comm hooks across {nodes} nodes, bytes per rank in the last step")
        for col in ("layout", "what", "predicted", "measured", "error"):
            hooks.add_column(col, justify="right")
        for h in result["hooks"]:
            hooks.add_row(h["layout"], h["what"], f"{h['predicted']:,.0f}", f"{h['measured']:,.0f}",
                          f"{h['predicted'] / h['measured'] - 1:+.1%}" if h["measured"] else "-")
        console.print(hooks)
    others = Table(title="rank 0, MiB: ours and two common estimators vs measured (peak; model states)")
    for col in ("layout", "peak measured", "scaletrain", "HF accelerate estimate-memory", "states measured",
                "scaletrain ", "DeepSpeed ZeRO estimator"):
        others.add_column(col, justify="right")

    def cell(predicted, measured) -> str:
        return "-" if predicted is None else f"{predicted / 2**20:.1f} ({predicted / measured - 1:+.0%})"

    for r in result["ranks"]:
        if r["rank"] == 0:
            peak, states = r["peak_measured"], sum(r["states_measured"].values())
            others.add_row(r["layout"], f"{peak / 2**20:.1f}", cell(r["peak_predicted"], peak),
                           cell(r["hf_accelerate_bytes"], peak), f"{states / 2**20:.1f}",
                           cell(sum(r["states_predicted"].values()), states), cell(r["deepspeed_bytes"], states))
    console.print(others)
    times = Table(title="step time: predicted vs measured (2-process layouts share the calibrated entry)")
    for col in ("layout", "predicted tokens/s", "measured tokens/s", "predicted / measured"):
        times.add_column(col, justify="right")
    for t in result["step_time"]:
        times.add_row(t["layout"], f"{t['predicted_tokens_per_s']:,.0f}", f"{t['measured_tokens_per_s']:,.0f}",
                      f"{t['ratio']:.2f}")
    console.print(times)
    ok = all(r["states_predicted"] == r["states_measured"] and r["collectives_predicted"] == r["collectives_measured"]
             for r in result["ranks"]) and worst <= 0.15
    console.print(f"model states and collectives exact: {'yes' if ok else 'NO'}; worst peak-memory error "
                  f"{worst:.1%} (target 15%)")
    return 0 if ok else 1
