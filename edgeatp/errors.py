"""Errors that mean "the user asked for something that cannot work": shown as one line by the CLI."""


class EdgeatpError(ValueError):
    """Base class of user-facing errors; the message names the problem and the fix."""


class DataError(EdgeatpError):
    """Prompt-pair data is malformed (which row, which column, what to change)."""


class ModelError(EdgeatpError):
    """A model cannot be loaded or used as asked."""
