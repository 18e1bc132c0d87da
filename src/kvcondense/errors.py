"""The one error type for a user's mistake.

The CLI turns a :class:`UsageError` into one line on stderr and exit status 2. Anything else that escapes is a bug
of ours and keeps its traceback, so library code raises ``UsageError`` (or a subclass) only for what the user can
fix: a bad flag, a missing or malformed file, a model that does not fit, a path that cannot be written.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Something the user gave cannot be used; the message names it and says what to do.

    A ``ValueError`` so that code catching the broad type keeps working; the CLI catches only this class.
    """


def optional(module: str, extra: str = "eval"):
    """Import an optional dependency, or say in one line which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise  # the library is there but broken: its own traceback
        raise UsageError(
            f"this needs {module.split('.')[0]}, which kvcondense installs with its [{extra}] extra: "
            f"pip install 'kvcondense[{extra}]'"
        ) from None
