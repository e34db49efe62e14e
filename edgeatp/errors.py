"""Errors that mean "the user asked for something that cannot work": shown as one line by the CLI.

A message may name the library's parameters as ``{placeholders}`` (``{top_k}``): the library shows
the parameter name (``top_k``) and the command line its flag (``--top-k``), so neither speaks the
other's language. Other braces in a message (from file names, say) are left alone.
"""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class EdgeatpError(ValueError):
    """Base class of user-facing errors; the message names the problem and the fix.

    ``options`` map the message's placeholders to the library's parameter names.
    """

    def __init__(self, template: str = "", **options: str) -> None:
        self.template = template
        self.options = options
        super().__init__(self.render(dict(options)))

    def render(self, names: dict[str, str]) -> str:
        """The message with each placeholder written as ``names[placeholder]``."""
        return _PLACEHOLDER.sub(lambda m: names.get(m[1], m[0]) if m[1] in self.options else m[0], self.template)


class DataError(EdgeatpError):
    """Prompt-pair data is malformed (which row, which column, what to change)."""


class ModelError(EdgeatpError):
    """A model cannot be loaded or used as asked."""


class OptionError(EdgeatpError):
    """A parameter value or a combination of parameters that cannot work."""


def option_error(template: str) -> OptionError:
    """An :class:`OptionError` whose ``{name}`` placeholders are parameter names themselves."""
    return OptionError(template, **{n: n for n in _PLACEHOLDER.findall(template)})
