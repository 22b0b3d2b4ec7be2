"""User-facing errors: each one names the problem and says what to do about it."""


class AdaspecError(Exception):
    """A problem with the user's input or environment. The CLI prints it without a traceback."""
