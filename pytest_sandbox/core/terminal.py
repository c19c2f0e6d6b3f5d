"""Container output made safe to show on a terminal (pure, stdlib only).

What a container prints reaches the user through failure reports, readiness errors and
``Result.check()``: a raw ``ESC [ 2 J`` there would clear their screen, an OSC 52 sequence could
write their clipboard, and a carriage return or a bidi override could make one line look like
another (issue 9, item 11; CVE-2021-42574 for the bidi trick).  So every character that
``str.isprintable`` refuses -- C0 and C1 controls, DEL, format characters such as U+202E, line
and paragraph separators -- is written as ``repr`` would write it (``\\x1b``, ``\\r``,
``\\u202e``), except newline and tab, which keep the output readable.
"""

from __future__ import annotations

_KEPT = frozenset("\n\t")


def escape_controls(text: str) -> str:
    """``text`` with every non-printable character but newline and tab escaped as repr does."""
    if text.isprintable():
        return text
    return "".join(c if c in _KEPT or c.isprintable() else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    return repr(c)[1:-1]  # "'\\x1b'" -> "\\x1b"; repr picks \\r, \\xNN, \\uNNNN or \\UNNNNNNNN


def output_text(data: bytes) -> str:
    """Bytes a container wrote, as text for a report: invalid UTF-8 replaced, controls escaped."""
    return escape_controls(data.decode(errors="replace"))
