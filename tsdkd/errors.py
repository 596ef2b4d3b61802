"""The one error type the CLI turns into a single line and exit code 2."""


class TsdkdError(Exception):
    """Bad input or a refused request: the message says what, where, and how to fix it."""
