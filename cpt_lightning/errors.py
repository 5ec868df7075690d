"""Errors the user fixes in their config or data: the CLI prints them as one line, no traceback."""


class UserError(ValueError):
    """A bad config value, file or data; the message names what to fix."""
