"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user. The message names the problem and the fix, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class JobFailed(RuntimeError):
    """A training job that ended badly for a reason other than bad input (a rank died or
    crashed, or a signal stopped it). The CLI prints its message on one line."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code
