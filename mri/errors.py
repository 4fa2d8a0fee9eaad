"""One exception type for every user-facing mistake, so the CLI can print it without a traceback."""


class MriError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and how to fix it."""
