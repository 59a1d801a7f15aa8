"""Output of the client commands: aligned tables and key/value blocks for people, JSON for
programs. No third-party dependencies.

JSON shape: protobuf messages go through `json_format.MessageToDict` with the proto field names,
every field present (zeros, empty lists and maps included) and int64 values as JSON numbers;
enums are their names ("ROUND_STATE_COMPLETED"). Commands whose output is not one message
document their own object in the command's help.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

Cell = object


def message_dict(msg: Message) -> dict[str, Any]:
    """A protobuf message as the CLI's JSON object (see the module docstring)."""
    return json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def cell_text(value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if text else "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """Columns separated by two spaces, each as wide as its widest cell; the last column is
    not padded. Empty values show as "-". No rows -> the header line only."""
    cells = [[cell_text(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells, headers {len(headers)}")
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    lines = []
    for row in [list(headers), *cells]:
        parts = [text.ljust(widths[i]) for i, text in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def fields(pairs: Iterable[tuple[str, Cell]]) -> str:
    """`key:  value` lines with the values aligned."""
    items = [(k, cell_text(v)) for k, v in pairs]
    if not items:
        return ""
    width = max(len(k) for k, _ in items) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}" for k, v in items)


def timestamp(ts: float) -> str:
    """Unix seconds as local ISO time to the second; "-" for 0 (not set)."""
    if not ts or not math.isfinite(ts):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def ago(ts: float, now: float | None = None) -> str:
    """How long ago `ts` was: "0.4s ago", "12s ago", "3m ago", "2h ago", "5d ago"; "never"
    for 0."""
    if not ts or not math.isfinite(ts):
        return "never"
    now = time.time() if now is None else now
    age = max(0.0, now - ts)
    if age < 10:
        return f"{age:.1f}s ago"
    if age < 120:
        return f"{age:.0f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    if age < 172800:
        return f"{age / 3600:.0f}h ago"
    return f"{age / 86400:.0f}d ago"


def short_name(enum_name: str, prefix: str) -> str:
    """ "ROUND_STATE_OPEN" -> "OPEN"."""
    return enum_name.removeprefix(prefix)


class Output:
    """Where a command writes: text blocks, one JSON document, or JSON lines. Flushed at once so
    a live stream (round watch) shows each line as it happens."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        # Resolved per write: tests and callers may swap sys.stdout.
        return self._stream if self._stream is not None else sys.stdout

    def text(self, block: str) -> None:
        self.stream.write(block if block.endswith("\n") else block + "\n")
        self.stream.flush()

    def json(self, value: object) -> None:
        """One JSON document, indented."""
        self.text(json.dumps(value, indent=2, sort_keys=False))

    def json_line(self, value: object) -> None:
        """One JSON object on one line (for streams)."""
        self.text(json.dumps(value, separators=(",", ":")))
