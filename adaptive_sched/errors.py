"""The one exception type for bad user input."""


class UsageError(ValueError):
    """Bad user input (name, parameter, file). The CLI prints `error: <message>` and exits 2."""
