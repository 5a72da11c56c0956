"""Log text that one record cannot break into two: names, paths and values from the API, files
and backends reach the logs, and a newline in one could forge a line that looks like the daemon's
own. JSON logs escape by construction (json.dumps); the text format escapes with this."""
from __future__ import annotations

import logging

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 controls, DEL, and what other readers take for a line break (NEL, LINE/PARAGRAPH SEPARATOR)
_ESCAPES = {c: _NAMED.get(chr(c), f"\\x{c:02x}") for c in (*range(0x20), 0x7F, 0x85)}
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape(text: str) -> str:
    """Control characters as \\n, \\r, \\t, \\xNN: the text stays on one line, and a terminal
    shown it obeys no escape sequence."""
    return text.translate(_ESCAPES)


class EscapingFormatter(logging.Formatter):
    """A logging.Formatter whose every record is one line (a traceback too, escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        return escape(super().format(record))
