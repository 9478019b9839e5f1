"""What rank 0 shows: a live progress bar on a terminal, plain lines otherwise,
and the final summary."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}"


class ProgressDisplay:
    def __init__(self, total_steps: int, enabled: bool, line_every: int):
        self.console = Console(stderr=True)
        self.enabled, self.total = enabled, total_steps
        self.live = enabled and self.console.is_terminal
        self.line_every = max(1, line_every)
        self.progress = None
        self.last_val = ""  # the latest validation loss stays on the line until the next one
        if self.live:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                     TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, status="")
            self.progress.start()

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        status = f"loss {record['loss']:.4f}  {_si(record['tokens_per_s'])} tok/s  lr {record['lr']:.2e}"
        if "val_loss" in record:
            self.last_val = f"  val {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})"
        status += self.last_val
        if self.live:
            self.progress.update(self.task, completed=step, status=status)
        elif step % self.line_every == 0 or step == self.total or step == 1:
            print(f"[rank0] step {step}/{self.total}  {status}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def print_summary(summary: dict) -> None:
    console = Console()
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    degrees = {k: v for k, v in summary["layout"].items() if k != "zero_stage" and v > 1}
    layout = " x ".join(f"{name} {deg}" for name, deg in degrees.items()) or "single process"
    if summary["layout"]["zero_stage"]:
        layout += f", ZeRO-{summary['layout']['zero_stage']}"
    table.add_row("model", f"{summary['model']} ({_si(summary['params'])} parameters)")
    table.add_row("layout", f"{layout} on {summary['world_size']} x {summary['device']}")
    table.add_row("steps", f"{summary['steps']} ({_si(summary['tokens'])} tokens)")
    table.add_row("loss", f"{summary['loss_first']:.4f} -> {summary['loss_last']:.4f} "
                          f"(first step -> mean of the last {summary['loss_last_window']})")
    if "best_val_loss" in summary:
        table.add_row("validation", f"loss {summary['val_loss']:.4f} at the end; best {summary['best_val_loss']:.4f} "
                                    f"at step {summary['best_val_step']}")
    table.add_row("throughput", f"{_si(summary['tokens_per_s'])} tokens/s, "
                                f"{_si(summary['flops_per_s_per_device'])}FLOP/s per device"
                                + (f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""))
    table.add_row("peak memory", f"{summary['mem_peak_bytes'] / 2**20:.0f} MiB per rank ({summary['mem_peak_source']})")
    table.add_row("time", f"{summary['elapsed_s']:.1f} s")
    table.add_row("run dir", summary["run_dir"])
    console.print(Panel(table, title="scaletrain: training done", expand=False))
    for sample in summary.get("samples", []):
        console.print(Panel(Text(sample), title="sample from the trained model", expand=False))
