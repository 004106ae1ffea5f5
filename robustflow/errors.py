"""The one exception type the command line turns into a one-line message."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong flag, unusable data.

    The message says what was wrong and what to do; ``robustflow`` prints it on one
    line to stderr and exits with status 2, without a traceback.
    """
