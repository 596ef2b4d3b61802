"""The errors the CLI turns into its last line and exit code: TsdkdError (one line, exit 2), ReportedFailure."""


class TsdkdError(Exception):
    """Bad input or a refused request: the message says what, where, and how to fix it."""


class ReportedFailure(Exception):
    """A process this one started failed and has printed why: end with its exit code and print nothing more."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"exit code {exit_code}")
        self.exit_code = exit_code
