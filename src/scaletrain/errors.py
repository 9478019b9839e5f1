"""User-facing errors: printed as one line starting ``error:``, exit code 2;
warnings: one line starting ``warning:``."""

import sys


class UserError(Exception):
    """Invalid input or usage. The message names the key or file and what is allowed."""

    exit_code = 2


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message``. DCP's CheckpointException (a
    BaseException) carries every rank's error with its traceback in one
    message: name the ranks and the first error instead."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        ranks = ", ".join(str(r) for r in sorted(failures))
        first = next(iter(failures.values()))
        return f"on rank(s) {ranks}: {describe_error(first[0] if isinstance(first, tuple) else first)}"
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")
