"""metrics.jsonl: the run's metrics log, one JSON line per logged step (keys sorted), durable and truncatable.

Read strictly: every line must be a JSON object with an integer `step`, the steps increasing. A bad
line is a one-line `MetricsError` naming the file and the line number, except the last line of a
file that does not end with a newline (a write torn by a crash): it is dropped with a warning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskkit.checkpoint import atomic_write_bytes

__all__ = ["MetricsError", "MetricsLog", "MetricsRead"]


class MetricsError(ValueError):
    """A metrics.jsonl that cannot be trusted; its message names the file and the line."""


@dataclass
class MetricsRead:
    """What `MetricsLog.load` found: the records, their lines as stored, and a warning for a torn last line."""

    records: list[dict[str, Any]] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    warning: str | None = None


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the record, "") or (None, why the line is not one)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as err:
        return None, f"not JSON ({err.msg} at column {err.colno})"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not an object"
    step = value.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None, "no integer 'step'" if "step" not in value else f"'step' is {json.dumps(step)}, not an integer"
    return value, ""


class MetricsLog:
    """metrics.jsonl: one JSON line per logged step, appended with flush + fsync."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line, durably."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load(self) -> MetricsRead:
        """Every line checked (MetricsError naming file and line); a torn last line is dropped with a warning."""
        found = MetricsRead()
        if not self.path.is_file():
            return found
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if data.endswith(b"\n") or not data:
            lines.pop()  # the empty text after the final newline
        torn = bool(data) and not data.endswith(b"\n")
        previous = None
        for number, raw in enumerate(lines, start=1):
            record, why = _parse(raw)
            if record is None and torn and number == len(lines):
                found.warning = f"{self.path} line {number} was cut short by a crash ({why}); dropped it"
                break
            if record is None:
                raise MetricsError(f"{self.path} line {number} is not a metrics record: {why}")
            if previous is not None and record["step"] <= previous:
                raise MetricsError(f"{self.path} line {number} has step {record['step']} after step {previous} "
                                   "(two writers, or an edited file)")  # fmt: skip
            previous = record["step"]
            found.records.append(record)
            found.lines.append(raw)
        return found

    def read(self) -> list[dict[str, Any]]:
        """Every record (see `load`: a bad line is a MetricsError, a torn last line is dropped)."""
        return self.load().records

    def truncate_after(self, step: int) -> list[str]:
        """Keep only the lines up to `step`, byte for byte and atomically (before resuming from that step).

        Returns the warnings (a torn last line that was dropped); MetricsError for any other bad line.
        """
        found = self.load()
        kept = [raw + b"\n" for raw, record in zip(found.lines, found.records, strict=True) if record["step"] <= step]
        atomic_write_bytes(self.path, b"".join(kept))
        return [found.warning] if found.warning else []
