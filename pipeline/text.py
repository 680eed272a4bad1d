"""Text from outside the process (a remote manifest, a server's reply, a command's stderr) made safe to print.

A newline, a carriage return or an escape sequence in such text could forge log lines or drive the
terminal (OSC titles, cursor moves, hyperlinks); every character that is not printable is shown as
its Python escape instead, and the text is cut to a length.
"""

from __future__ import annotations


def printable(text: str, limit: int = 300) -> str:
    """`text` with every non-printable character escaped (`\\n`, `\\x1b`, `\\u202e`), at most `limit` characters."""
    safe = text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."
