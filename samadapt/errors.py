"""The one exception class for mistakes a user can fix.

The CLI prints a ``UserError`` as a single line (``error: <message>``) and exits with code 2;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: say which file/key and how to fix it, in one line."""


def one_line(text: str) -> str:
    """Collapse whitespace so a message (e.g. from a library) prints as one line."""
    return " ".join(str(text).split())
