"""The one base class of every error a user is meant to read.

A command line catches `AslError` and prints its message as one line; anything else is a bug and keeps
its traceback. Subclasses also derive from the builtin they refine (ValueError, OSError, ...), so
callers that catch those keep working.
"""

from __future__ import annotations


class AslError(Exception):
    """An error whose message, alone on one line, tells the user what is wrong and where."""
