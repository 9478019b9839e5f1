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

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (e.g. configs/tiny.toml).")
SetOpt = typer.Option([], "--set", "-s", help="Override one key: section.key=value (repeatable).")


@app.command()
def train(
    config: Optional[str] = ConfigOpt,
    set_: List[str] = SetOpt,
    nproc: int = typer.Option(1, "--nproc", "-n", help="Local worker processes (started with torchrun)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/<timestamp>)."),
) -> None:
    """Train a model. Under an external torchrun, joins the existing process group."""
    from scaletrain.train import train as run_train

    raise typer.Exit(run_train(config, set_, nproc, run_dir))


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
