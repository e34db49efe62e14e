"""Errors that mean "the user asked for something that cannot work": shown as one line by the CLI."""

from __future__ import annotations

import string


class EdgeatpError(ValueError):
    """Base class of user-facing errors; the message names the problem and the fix."""


class DataError(EdgeatpError):
    """Prompt-pair data is malformed (which row, which column, what to change)."""


class ModelError(EdgeatpError):
    """A model cannot be loaded or used as asked."""


class OptionError(EdgeatpError):
    """A parameter value or a combination of parameters that cannot work.

    ``options`` map the template's placeholders to the library's parameter names (``{top_k}`` →
    ``top_k``), so the library shows ``top_k`` and the command line shows its flag (``--top-k``).
    """

    def __init__(self, template: str, **options: str) -> None:
        self.template = template
        self.options = options
        super().__init__(self.render(dict(options)))

    def render(self, names: dict[str, str]) -> str:
        """The message with each placeholder written as ``names[placeholder]``."""
        return self.template.format(**{k: names.get(k, v) for k, v in self.options.items()})


def option_error(template: str) -> OptionError:
    """An :class:`OptionError` whose ``{name}`` placeholders are parameter names themselves."""
    names = {field for _, field, _, _ in string.Formatter().parse(template) if field}
    return OptionError(template, **{n: n for n in names})
