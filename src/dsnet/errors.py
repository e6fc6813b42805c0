"""The one user-facing error type of dsnet.

:class:`DSNetError` marks a problem with the user's input: a bad config value, a file that is missing, unreadable
or of the wrong kind, a tensor or image of the wrong shape. The ``dsnet`` command line prints it as one line,
``dsnet: error: <message>``, and exits with code 2. Any other exception is a bug and keeps its traceback.

It subclasses :class:`ValueError` so that callers catching ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["DSNetError"]


class DSNetError(ValueError):
    """A problem with the user's input (a bad config value, file or shape); the message names it and the fix."""
