"""The one base class of every error a user is meant to read, and the one line a command prints for it.

A command line catches `AslError` and `OSError` and prints `one_line` of it; anything else is a bug and
keeps its traceback. Subclasses also derive from the builtin they refine (ValueError, OSError, ...), so
callers that catch those keep working.
"""

from __future__ import annotations

import io
import os
import sys

from pipeline.text import printable

# An error message is one line, however long the file names in it; the cut only guards against a runaway text.
MESSAGE_LIMIT = 2000


class AslError(Exception):
    """An error whose message, alone on one line, tells the user what is wrong and where."""


def one_line(exc: AslError | OSError) -> str:
    """The line a command prints for a user's error: its message, an OSError's file and reason, or that standard
    output cannot be written (closed, or a full device); control characters escaped (`pipeline.text`)."""
    if isinstance(exc, AslError) or not isinstance(exc, OSError):
        return printable(str(exc), MESSAGE_LIMIT)
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        files = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        return printable(f"{files}: {reason}", MESSAGE_LIMIT)
    if writing_output(exc):
        silence_stdout()
        return printable(f"cannot write to standard output ({reason})", MESSAGE_LIMIT)
    return printable(reason, MESSAGE_LIMIT)


def writing_output(exc: OSError) -> bool:
    """Whether `exc` came from a command writing its output: click's `echo` was the last Python code it passed
    (the write itself is C), as every command of this project writes through it."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code, tb.tb_next
    return (
        last is not None and last.co_name == "echo" and os.path.basename(os.path.dirname(last.co_filename)) == "click"
    )


def silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush at exit does not fail again on a
    closed or full one (a second message, and exit status 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # no file descriptor (a test's captured stream)
        pass
