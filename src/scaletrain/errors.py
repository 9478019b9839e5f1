"""User-facing errors: printed as one line starting ``error:``, exit code 2."""


class UserError(Exception):
    """Invalid input or usage. The message names the key or file and what is allowed."""

    exit_code = 2
