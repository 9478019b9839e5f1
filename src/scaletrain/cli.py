"""The command line: parse, call, print. Every error the user can fix is one
line on stderr starting ``error:`` with exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from scaletrain.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train transformer language models from one process to a cluster.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
app.add_typer(config_app, name="config")
checkpoint_app = typer.Typer(no_args_is_help=True, help="Inspect, export and import checkpoints.")
app.add_typer(checkpoint_app, name="checkpoint")

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (e.g. configs/tiny.toml).")
SetOpt = typer.Option([], "--set", "-s", help="Override one key: section.key=value (repeatable).")


@app.command()
def train(
    config: Optional[str] = ConfigOpt,
    set_: List[str] = SetOpt,
    nproc: int = typer.Option(1, "--nproc", "-n", help="Local worker processes (started with torchrun)."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Run directory (default runs/<timestamp>); "
                                         "new, empty, or an earlier run's (to resume it)."),
    max_restarts: int = typer.Option(0, "--max-restarts", help="Restart the workers up to K times when one "
                                      "dies (torchrun's elastic agent); each restart resumes from the newest "
                                      "checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start even when the memory pre-flight estimates that "
                               "the job does not fit in this machine's memory."),
) -> None:
    """Train a model. Under an external torchrun, joins the existing process group."""
    from scaletrain.train import train as run_train

    raise typer.Exit(run_train(config, set_, nproc, run_dir, max_restarts, force))


@config_app.command("show")
def config_show(config: Optional[str] = ConfigOpt, set_: List[str] = SetOpt) -> None:
    """Print the resolved config as TOML."""
    from scaletrain.config import load_config

    print(load_config(config, set_).to_toml(), end="")


@config_app.command("keys")
def config_keys() -> None:
    """List every config key with its type, default and meaning."""
    from scaletrain.config import config_help

    print(config_help())


@config_app.command("import-deepspeed")
def config_import_deepspeed(
    ds_config: Path, config: Optional[str] = ConfigOpt, set_: List[str] = SetOpt,
    world_size: Optional[int] = typer.Option(None, "--world-size", help="Data-parallel ranks, when the DeepSpeed "
                                             "config has no train_batch_size."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the TOML here instead of stdout."),
) -> None:
    """A DeepSpeed JSON config as a scaletrain config (on --config's base); warns about what cannot carry over."""
    from scaletrain.config_deepspeed import import_deepspeed

    cfg = import_deepspeed(ds_config, config, set_, world_size, lambda m: print(f"warning: {m}", file=sys.stderr))
    if out is None:
        print(cfg.to_toml(), end="")
    else:
        out.write_text(cfg.to_toml())
        print(f"wrote {out}; train with: scaletrain train --config {out}")


@checkpoint_app.command("inspect")
def checkpoint_inspect(path: Path, as_json: bool = typer.Option(False, "--json", help="Machine-readable.")) -> None:
    """Step, layout, tensors, sizes and validity of a checkpoint directory."""
    import json

    from scaletrain.checkpoint import describe

    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    info = describe(path)
    if as_json:
        print(json.dumps(info, indent=1))
    else:
        print(f"{info['path']}: {'valid' if info['valid'] else 'INVALID: ' + str(info['problem'])}")
        if "step" in info:
            print(f"step {info['step']}, layout {info['layout']}, zero_stage {info['zero_stage']}, "
                  f"{info['files']} files, {info['bytes'] / 2**20:.2f} MiB")
        for key, shape in info.get("tensors", {}).items():
            print(f"  {key} {tuple(shape)}")
    raise typer.Exit(0 if info["valid"] else 1)


@checkpoint_app.command("export")
def checkpoint_export(path: Path, to: str = typer.Option("hf", "--to", help="Target format: hf or deepspeed."),
                      out: Path = typer.Argument(..., help="Output folder."),
                      force: bool = typer.Option(False, "--force", help="Write into a non-empty folder."),
                      zero_stage: int = typer.Option(2, "--zero-stage", help="--to deepspeed: ZeRO stage (1-3) of "
                                                     "the DeepSpeed run that loads it."),
                      world_size: int = typer.Option(1, "--world-size", help="--to deepspeed: its data-parallel "
                                                     "ranks."),
                      bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="--to deepspeed: whether "
                                                          "it trains in bf16 (default: as this run did).")) -> None:
    """Write a checkpoint's weights and tokenizer as a HF Transformers LlamaForCausalLM folder, or
    (--to deepspeed) weights and optimizer states as a DeepSpeed ZeRO checkpoint."""
    from scaletrain.checkpoint.hf import export_hf

    if to == "deepspeed":
        from scaletrain.checkpoint.deepspeed_convert import export_deepspeed

        done = export_deepspeed(path, out, zero_stage, world_size, force, bf16)
        print(f"wrote {done}; load it in DeepSpeed with engine.load_checkpoint({str(done)!r})")
        return
    if to != "hf":
        raise UserError(f"--to {to!r}; allowed: hf, deepspeed")
    print(f"wrote {export_hf(path, out, force)}")


@checkpoint_app.command("import")
def checkpoint_import(hf_dir: Path = typer.Argument(..., metavar="DIR"), out: Path = typer.Argument(...),
                      config: Optional[str] = ConfigOpt, set_: List[str] = SetOpt,
                      from_: str = typer.Option("hf", "--from", help="hf (a HF Llama folder) or deepspeed (a "
                                                "DeepSpeed ZeRO-1/2/3 checkpoint folder).")) -> None:
    """Turn a HF Llama folder into a scaletrain checkpoint to fine-tune from
    (then: scaletrain train --config OUT/config.toml --set checkpoint.init_from=OUT), or (--from deepspeed)
    a DeepSpeed checkpoint into one that resumes its training (--set checkpoint.resume=OUT)."""
    from scaletrain.checkpoint.hf import import_hf
    from scaletrain.config import load_config

    if from_ == "deepspeed":
        from scaletrain.checkpoint.deepspeed_convert import import_deepspeed

        done, resumes = import_deepspeed(hf_dir, out, load_config(config, set_))
        key = "resume" if resumes else "init_from"
        print(f"wrote {done}; continue with: scaletrain train --config {done}/config.toml "
              f"--set checkpoint.{key}={done}")
        return
    if from_ != "hf":
        raise UserError(f"--from {from_!r}; allowed: hf, deepspeed")
    done = import_hf(hf_dir, out, load_config(config, set_))
    print(f"wrote {done}; train from it with: scaletrain train --config {done}/config.toml "
          f"--set checkpoint.init_from={done}")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of the machine.")
app.add_typer(bench_app, name="bench")

from scaletrain.launch.cli import allocate, launch_app  # noqa: E402  (typer only; the work loads on use)

app.add_typer(launch_app, name="launch")
app.command("allocate")(allocate)

from scaletrain.serve.cli import bench_serve, router, serve  # noqa: E402  (typer only; the work loads on use)

app.command("serve")(serve)
app.command("router")(router)
bench_app.command("serve")(bench_serve)


@app.command()
def dashboard(
    run_dirs: Optional[List[Path]] = typer.Argument(None, help="Run directories, or folders of them like runs/ "
                                                    "(default: ./runs)."),
    port: int = typer.Option(8050, "--port", help="Port to listen on (0 picks a free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 to accept remote browsers)."),
) -> None:
    """Live curves, per-rank step times, alerts and checkpoints of one or more runs, in the browser."""
    from scaletrain.observe.dashboard import serve as run

    raise typer.Exit(run(list(run_dirs or []), host, port))


@app.command()
def plan(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Preset (7b, 70b, ...), a scaletrain .toml "
                                        "config or a HF config.json (default: --config's model)."),
    gpus: int = typer.Option(8, "--gpus", help="GPUs in the cluster."),
    gpu: str = typer.Option("a100-80g", "--gpu", help="Catalog name, or a mixed cluster name:count,name:count."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Sequence length (default 4096 or --config's)."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Sequences per step (default 1024)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default bf16)."),
    config: Optional[str] = ConfigOpt,
    top: int = typer.Option(10, "--top", help="Rows to print."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    hardware: Optional[Path] = typer.Option(None, "--hardware", help="Extra hardware catalog TOML."),
    verify: bool = typer.Option(False, "--verify", help="Run the real trainer on this machine for small layouts "
                                "and compare predictions with measurements."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Measure this machine and write a hardware entry."),
    name: str = typer.Option("local-cpu", "--name", help="Hardware entry that --calibrate writes and --verify uses."),
    nproc: int = typer.Option(2, "--nproc", help="Workers per machine for --calibrate."),
    layouts: Optional[str] = typer.Option(None, "--layouts", help="--verify: comma-separated subset of layouts."),
    nodes: int = typer.Option(1, "--nodes", help="--verify: 2 runs layouts that span two network-namespace nodes "
                              "(root; 127.0.0.1 otherwise) and checks the comm hooks' bytes."),
    link_rate: str = typer.Option("200mbit", "--link-rate", help="--verify --nodes 2: the inter-node link's tc rate."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Only layouts with this micro batch."),
    explain: Optional[int] = typer.Option(None, "--explain", help="Print the arithmetic of the N-th layout."),
    min_gpus: bool = typer.Option(False, "--min-gpus", help="How many GPUs of --gpu the job needs: a scaling "
                                  "table over GPU counts up to --max-gpus."),
    max_gpus: int = typer.Option(1024, "--max-gpus", help="--min-gpus: the largest count tried."),
    references: bool = typer.Option(False, "--references", help="Published runs vs predictions, held-out error."),
) -> None:
    """Predict memory, communication and step time of every parallel layout; rank them."""
    from scaletrain.planner import cli as plan_cli

    if references:
        from scaletrain.planner.report import print_references

        raise typer.Exit(print_references(as_json))
    if calibrate:
        raise typer.Exit(plan_cli.run_calibrate(name, nproc, hardware))
    if verify:
        raise typer.Exit(plan_cli.run_verify(name, hardware, layouts, as_json, nodes, link_rate))
    raise typer.Exit(plan_cli.run_plan(model, gpus, gpu, gpus_per_node, seq_len, global_batch, dtype, config, top,
                                       as_json, hardware, micro_batch, explain, min_gpus, max_gpus))


@app.command()
def doctor(
    nproc: int = typer.Option(1, "--nproc", "-n", help="Local ranks to check (ignored under torchrun)."),
    check: Optional[str] = typer.Option(None, "--check", help="Comma-separated checks (default: all): versions, "
                                        "devices, shm, disk, rendezvous, env, gpu_health, all_reduce."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    directory: Path = typer.Option(Path("runs"), "--dir", help="Where checkpoints will go (free-disk check)."),
    master: Optional[str] = typer.Option(None, "--master", help="HOST:PORT of a rendezvous to test reaching."),
) -> None:
    """Check the environment of a distributed job: PASS / WARN / FAIL with the fix."""
    from scaletrain.debug.cli import doctor as run

    raise typer.Exit(run(nproc, check, as_json, directory, master))


@bench_app.command("comm")
def bench_comm(
    nproc: int = typer.Option(2, "--nproc", "-n", help="Local ranks (ignored under torchrun)."),
    ops: str = typer.Option("all", "--ops", help="Comma-separated: all_reduce, all_gather, reduce_scatter, "
                            "broadcast, send_recv; or all."),
    min_bytes: str = typer.Option("1K", "--min-bytes", help="Smallest message (e.g. 4, 1K, 1M)."),
    max_bytes: str = typer.Option("16M", "--max-bytes", help="Largest message."),
    iters: int = typer.Option(10, "--iters", help="Timed calls per size."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON results here."),
) -> None:
    """Time collectives over a size sweep (nccl-tests conventions), checking every result."""
    from scaletrain.debug.cli import bench_comm as run

    raise typer.Exit(run(nproc, ops, min_bytes, max_bytes, iters, as_json, out))


runs_app = typer.Typer(no_args_is_help=True, help="Look at runs.")
app.add_typer(runs_app, name="runs")


@runs_app.command("show")
def runs_show(run_dir: Path) -> None:
    """A run's summary, time breakdown per rank, events (restarts, hangs, skipped steps, failed saves) and alerts."""
    from scaletrain.observe.runs import show_run

    show_run(run_dir)


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="scaletrain", standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:
        # click's exception types (vendored inside newer typer releases),
        # matched by name so either packaging works.
        names = {cls.__name__ for cls in type(exc).__mro__}
        if "Exit" in names:
            code = exc.exit_code
        elif "NoArgsIsHelpError" in names:
            print(exc.ctx.get_help())
            code = 0
        elif "UsageError" in names:
            print(f"error: {exc.format_message()}", file=sys.stderr)
            code = 2
        elif "Abort" in names:
            code = 130
        else:
            raise
    sys.exit(code or 0)
