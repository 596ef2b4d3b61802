"""The errors the CLI turns into its last line and exit code: TsdkdError (one line, exit 2), ReportedFailure."""


class TsdkdError(Exception):
    """Bad input or a refused request: the message says what, where, and how to fix it."""


class ReportedFailure(Exception):
    """A process this one started failed: end with its exit code, printing `line` as the error, or nothing more
    where the process has printed why itself."""

    def __init__(self, exit_code: int, line: str | None = None) -> None:
        super().__init__(line or f"exit code {exit_code}")
        self.exit_code, self.line = exit_code, line
