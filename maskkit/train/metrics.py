"""metrics.jsonl: the run's metrics log, one JSON line per logged step (keys sorted), durable and truncatable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from maskkit.checkpoint import atomic_write_text


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

    def read(self) -> list[dict[str, Any]]:
        """Every complete line (a torn last line after a crash is dropped)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line after a crash
        return records

    def truncate_after(self, step: int) -> None:
        """Keep only the lines up to `step` (atomically), e.g. before resuming from that step."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
