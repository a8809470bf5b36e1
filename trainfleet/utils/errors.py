"""User-facing errors.

A :class:`UsageError` is bad input: the console scripts print its one-line
message and exit with status 2, never a traceback.
"""


class UsageError(ValueError):
    """Bad input from the user: one line saying what was given, what was expected, a hint."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.hint = hint
        super().__init__(f"{message} HINT: {hint}" if hint else message)
